"""The subcommands of ``torchpeer``: one module each, listed here in ``--help`` order.

A subcommand module defines ``add_parser(subparsers) -> argparse.ArgumentParser`` (which calls
``subparsers.add_parser(NAME, ...)`` and ``set_defaults(func=run)``; ``takes_overrides=True`` if it
accepts ``--section.field VALUE`` config overrides, then given as ``args.overrides``: (key, value)
pairs) and ``run(args) -> int`` (the exit status). Import heavy modules inside ``run``: building
the parser imports every module listed here. Adding a subcommand = its module + one line below.
"""

COMMANDS: list[str] = [
    "torchpeer.cli.train",
    "torchpeer.cli.eval",
    "torchpeer.cli.generate",
    "torchpeer.cli.info",
    "torchpeer.cli.data",
    "torchpeer.hf.export",
    "torchpeer.experiments.sweep_command",
    "torchpeer.experiments.report_command",
    "torchpeer.viz.cli",
]
