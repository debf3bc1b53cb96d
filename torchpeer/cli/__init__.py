"""Command line: ``torchpeer train | eval | generate | info | data | ...`` (cli/registry.py lists them).

Bad input (missing file, unknown config field or FFW kind, resume with another model, an
unwritable run folder, ...) is reported as one line ``error: ...`` on stderr with exit status 2,
without a traceback (``TORCHPEER_TRACEBACK=1`` shows it). An interrupted ``train`` exits 130
(SIGINT) or 143 (SIGTERM) after writing a checkpoint; Ctrl-C anywhere else in ``main`` (imports of a
subcommand, tokenising, evaluating) prints "interrupted" and exits 130, without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from torchpeer.cli.registry import COMMANDS


class Parser(argparse.ArgumentParser):
    """argparse's own errors (a value of the wrong type, an option without its value, a missing
    argument, a bad choice) as the one-line ValueError that ``main`` prints, naming the command and
    its --help, instead of the usage block and a second line ("invalid int value: 'abc'")."""

    def error(self, message: str):
        where = self.prog
        if message.startswith("the following arguments are required: "):
            names = message.split(": ", 1)[1].split(", ")
            helps = {(a.metavar or a.dest): a.help for a in self._actions if not a.option_strings and a.help}
            shown = "; ".join(f"{n.upper()}: {helps[n]}" if n in helps else n.upper() for n in names)
            raise ValueError(f"{where} needs {shown} (examples: {where} --help)")
        raise ValueError(f"{where}: {message} ({where} --help lists its options)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="torchpeer",
        description="PEER (Mixture of A Million Experts) language-model toolkit.",
    )
    parser.add_argument("--version", action="version", version=version_line(), help="versions of torchpeer and torch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    parser.set_defaults(override_commands=[])  # the subcommands that take --section.field overrides
    for module in COMMANDS:
        p = importlib.import_module(module).add_parser(sub)
        if p.get_default("takes_overrides"):
            parser.get_default("override_commands").append(p.prog.split()[-1])
    return parser


def version_line() -> str:
    """ "torchpeer 0.1.0 (torch 2.13.0+cpu, python 3.11.7)", read from the installed packages'
    metadata: importing torch for its version would take a second."""
    import platform
    from importlib import metadata

    from torchpeer import __version__

    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    return f"torchpeer {__version__} (torch {torch}, python {platform.python_version()})"


SECTION_EXAMPLES = {"--model": "--model.ffw dense", "--train": "--train.max_steps 100", "--data": "--data.train FILE"}


def check_no_bare_section(args: list[str]) -> None:
    """``--model peer`` (a section given as if it were an option) is one error that shows the dotted
    form, instead of argparse's "unrecognized arguments"."""
    for a in args:
        flag = a.split("=", 1)[0]
        if flag in SECTION_EXAMPLES:
            raise ValueError(
                f"{flag} is a config section, not an option; set one of its fields, e.g. {SECTION_EXAMPLES[flag]}"
            )


def os_error_message(e: BaseException) -> str | None:
    """A bare OS error from inside a command ("[Errno 17] File exists: 'x'") as one line that says
    which path is wrong and what to do; None for any other error (their messages already say it)."""
    inner = e.__context__
    if not isinstance(e, OSError) and isinstance(inner, OSError) and str(e) == str(inner):
        e = inner  # re-raised as is, e.g. ValueError(str(os_error))
    if not isinstance(e, OSError) or not e.filename or not e.strerror or not str(e).startswith("[Errno"):
        return None
    path = os.fspath(e.filename)
    if e.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where a folder is needed: makedirs, an output path
        blocker = path
        while blocker and not os.path.isfile(blocker) and os.path.dirname(blocker) != blocker:
            blocker = os.path.dirname(blocker)
        if os.path.isfile(blocker):
            where = "" if blocker == path else f" (in {path})"
            return f"{blocker} is a file, not a folder{where}; choose another path"
    return f"{path}: {e.strerror}"


def check_command(parser: argparse.ArgumentParser, word: str) -> None:
    """A misspelt subcommand (``torchpeer trian``) is one error that names the closest one."""
    import difflib

    names = list(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
    if word.startswith("-") and word.split("=", 1)[0] not in ("-h", "--help", "--version"):
        raise ValueError(f"torchpeer has no option {word}; give a command first: {', '.join(names)} (torchpeer --help)")
    if word.startswith("-") or word in names:
        return
    close = [n for n in names if n.startswith(word)] or difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    close = close if len(close) == 1 else []  # one clear candidate, or none
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ValueError(f"unknown command '{word}'; {hint}commands: {', '.join(names)} (torchpeer --help)")


def unknown_arguments_message(parser: argparse.ArgumentParser, command: str, extra: list[str]) -> str:
    """An argument the subcommand does not take, as one line that names the subcommand and, where
    there is one, what was meant: its option spelt the other way (``--max_batches`` for
    ``--max-batches``, ``--runs-dir`` for ``--run-dir``) or, for the commands that take config
    overrides, the dotted field (``--max-steps 100`` -> ``--train.max_steps``)."""
    import difflib

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    word = extra[0]
    where = f"torchpeer {command}"
    if not word.startswith("-") or word == "-":
        extras = " ".join(repr(e) for e in extra)
        return (
            f"unexpected argument{'s' * (len(extra) > 1)} {extras} for {where} (quote a value that holds "
            f"spaces; {where} --help lists its arguments)"
        )
    flag = word.split("=", 1)[0]
    options = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
    norm = {o.replace("_", "-"): o for o in options}
    hint = ""
    if flag.replace("_", "-") in norm:
        hint = f"; did you mean {norm[flag.replace('_', '-')]}?"
    elif close := difflib.get_close_matches(flag, options, n=1, cutoff=0.75):
        hint = f"; did you mean {close[0]}?"
    elif sub.get_default("takes_overrides"):
        from torchpeer.lm.config_io import closest_field, run_config_fields

        leaf = flag.lstrip("-").replace("-", "_")
        field = closest_field(leaf, [n for n in run_config_fields() if "." in n])  # not the name
        if field:
            hint = f"; config fields are set with their section: --{field} VALUE"
        else:
            hint = "; config fields are set with their section, e.g. --train.max_steps 100"
    return f"{where} has no option {flag}{hint} ({where} --help lists its options)"


def overrides_message(parser: argparse.ArgumentParser, command: str, key: str, value: str, spec: str = "") -> str:
    """``--section.field VALUE`` given to a command that takes no config overrides, as one line that
    says where such a value goes instead: the command's own option (``eval --train.eval_batch_size 8``
    -> ``--batch-size``, ``data --data.train X`` -> ``--train``) or, for a sweep, its spec's [base]
    table (argparse's error came with the top-level usage and no way forward)."""
    import difflib
    import json

    takers = parser.get_default("override_commands")
    names = ", ".join(takers[:-1]) + " and " + takers[-1] if len(takers) > 1 else "".join(takers)
    where = f"torchpeer {command}"
    head = f"{where} takes no config overrides (--{key} ...: they apply to {names})"
    if command == "sweep":
        try:
            shown = json.dumps(json.loads(value))  # 1e-3, true, [1, 3] as TOML writes them
        except ValueError:
            shown = json.dumps(value)  # text: a TOML string
        line = f'"{key}" = {shown}'
        if spec and not os.path.isfile(spec):  # a shipped spec's name: the user edits a copy
            spec = f"a copy of torchpeer/experiments/specs/{spec.removesuffix('.toml')}.toml"
        return f"{head}; a sweep's runs take their fields from its spec: add {line} to the [base] table of {spec}"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    options = {o: a for a in sub._actions for o in a.option_strings if o.startswith("--")}
    parts = key.split(".")
    if parts[:2] == ["data", "valid"]:  # an eval set: data --valid NAME=SOURCE, eval --data NAME=SOURCE
        flag = next((o for o in ("--valid", "--data") if o in options), None)
        wanted = f"{flag} {parts[2] + '=' if len(parts) > 2 else ''}{value}" if flag else None
    else:
        leaf = "--" + parts[-1].replace("_", "-")
        close = [leaf] if leaf in options else difflib.get_close_matches(leaf, list(options), n=1, cutoff=0.75)
        wanted = f"{close[0]} {value}" if close and options[close[0]].nargs != 0 else (close or [None])[0]
    fix = f"did you mean {wanted}?" if wanted else f"{where} --help lists its options"
    return f"{head}; {fix}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        from torchpeer.lm.config_io import split_overrides  # in the try: Ctrl-C while importing is handled

        rest, overrides = split_overrides(argv)
        parser = build_parser()
        if not rest:  # a bare `torchpeer`: the list of commands, not argparse's "arguments are required"
            parser.print_help(sys.stderr)
            return 2
        check_command(parser, rest[0])
        if rest[0] in parser.get_default("override_commands"):
            check_no_bare_section(rest[1:])
        args, extra = parser.parse_known_args(rest)
        if extra:  # argparse's own error shows the top-level usage, not the subcommand's options
            raise ValueError(unknown_arguments_message(parser, rest[0], extra))
        if overrides and not getattr(args, "takes_overrides", False):
            raise ValueError(overrides_message(parser, rest[0], *overrides[0], spec=getattr(args, "spec", "")))
        args.overrides = overrides
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `torchpeer info --json | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("TORCHPEER_TRACEBACK", "").strip().lower() not in ("", "0", "false", "no", "off"):
            raise  # debugging: the full traceback instead of the one-line message
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {os_error_message(e) or msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
