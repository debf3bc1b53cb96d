"""``torchpeer sweep SPEC [--runs-dir DIR] [--dry-run] [--only GLOB]`` (argparse side only; the
work is imported when the command runs, so registering it costs nothing)."""

from __future__ import annotations

import contextlib

EPILOG = """\
SPEC is a shipped spec name ({specs}) or a TOML path;
see docs/experiments.md for the format. The sweep is resumable: run the same command again and
finished runs are skipped, an interrupted one resumes from its latest checkpoint.

examples:
  torchpeer sweep cpu-smoke --runs-dir runs/cpu-smoke
  torchpeer sweep isoflop --dry-run --assume-tokens-per-s 600000
  torchpeer sweep isoflop --only 'peer-*-1e15' --time-limit 540
  torchpeer sweep isoflop --parallel 8 --time-limit 470 --stop-at 525 --drop-checkpoints   # one 10-min GPU job
"""


def add_parser(subparsers):
    from torchpeer.cli.common import HelpFormatter  # keeps the examples, wraps the prose
    from torchpeer.experiments.spec import list_specs  # the spec folder's names; no torch

    p = subparsers.add_parser(
        "sweep",
        help="plan and run a sweep of training runs (isoFLOP, ablations)",
        description="Train every (variant, budget) run of a sweep spec, resumably; one line per run in "
        "RUNS_DIR/results.jsonl.",
        epilog=EPILOG.format(specs=", ".join(list_specs())),
        formatter_class=HelpFormatter,
    )
    p.add_argument("spec", help="shipped spec name or path to a spec TOML")
    p.add_argument("--runs-dir", default=None, help="folder of the runs and results.jsonl (default: runs/<sweep name>)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (tokens, FLOPs, estimated GPU memory and time), build every run to train on the meta "
        "device (model, table optimizer, AdamW groups: a design that would fail on the GPU fails here) and exit",
    )
    p.add_argument("--only", default=None, help="only runs whose name matches this glob (comma-separated globs)")
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no run that would end past this many seconds (by the measured tokens/s of its variant)",
    )
    p.add_argument(
        "--assume-tokens-per-s",
        type=float,
        default=None,
        help="for --dry-run / --time-limit: the tokens/s of variants without a measured one",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="train N runs at once, each in its own process (small models leave a big GPU idle); the data "
        "are tokenised once first; default 1 (one after another in this process)",
    )
    p.add_argument(
        "--stop-at",
        type=float,
        default=None,
        metavar="SECONDS",
        help="interrupt runs still training this many seconds after the start (they resume from a "
        "checkpoint when train.checkpoint is on, else restart next time); for jobs with a hard end. Runs are "
        "trained in worker processes then, also with --parallel 1",
    )
    p.add_argument(
        "--drop-checkpoints",
        action="store_true",
        help="delete a run's checkpoints once its result is recorded (they only serve resuming; GBs per PEER run)",
    )
    p.add_argument(
        "--longest-first",
        action="store_true",
        help="with --parallel or --stop-at: start the runs by estimated time, longest (and unknown) first, not in plan "
        "order (runs resuming a checkpoint still go first): a GPU lease's first commands then start the long runs that "
        "its last, time-limited command could not",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def check_not_a_run_folder(runs_dir: str) -> None:
    """ValueError (one line) when ``runs_dir`` is one training run's folder (runs/x of ``torchpeer
    train``: config.json, metrics.jsonl or checkpoints/ at its top), which a sweep would fill with
    its own run folders and results.jsonl beside the run's files, say after --runs-dir was given a
    run by mistake. A sweep's runs folder never holds these itself; missing, empty and sweep
    folders pass. Called by the CLI before anything is planned or written."""
    import os

    from torchpeer.lm.rundir import RUN_MARKERS

    if not os.path.isdir(runs_dir) or os.path.exists(os.path.join(runs_dir, "results.jsonl")):
        return
    found = [m for m in RUN_MARKERS if os.path.exists(os.path.join(runs_dir, m))]
    if found:
        raise ValueError(
            f"{runs_dir} is a training run's folder (it holds {', '.join(found)}), not a sweep's runs folder; "
            "a sweep would put its runs among the run's files, so nothing was written: give --runs-dir a new "
            "or empty folder, or a sweep's runs folder (it holds results.jsonl)"
        )


def continue_command(args, runs_dir: str) -> str:
    """The command line that continues an interrupted sweep: the same one, with its runs folder."""
    import shlex

    cmd = ["torchpeer", "sweep", args.spec, "--runs-dir", runs_dir]
    for flag, value in (
        ("--only", args.only),
        ("--time-limit", args.time_limit),
        ("--assume-tokens-per-s", args.assume_tokens_per_s),
        ("--stop-at", args.stop_at),
    ):
        if value is not None:
            cmd += [flag, value if isinstance(value, str) else f"{value:g}"]
    if args.parallel != 1:
        cmd += ["--parallel", str(args.parallel)]
    cmd += ["--drop-checkpoints"] * bool(args.drop_checkpoints) + ["--longest-first"] * bool(args.longest_first)
    cmd += ["--no-progress"] * bool(args.no_progress)
    return shlex.join(cmd)


class SweepStopped(KeyboardInterrupt):
    """SIGTERM or SIGINT reached the sweep: it stops its runs as on Ctrl-C (they checkpoint)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals():
    """Within: SIGTERM (a job's time limit) stops the sweep as Ctrl-C does, and so does SIGINT even
    when the sweep was started with it ignored (a background job of a script, as scripts/device_sweep.sh
    runs it). The first signal counts: later ones are ignored, so the runs' interrupt checkpoints are
    not cut short (the pool still kills a run past its grace period). The handlers before are restored.
    Off the main thread (a sweep started from a notebook's or a server's worker thread) Python allows
    no signal handlers: there it changes nothing and Ctrl-C stays the caller's."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SweepStopped(signum)

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    for sig in before:
        signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def run(args) -> int:
    import os

    from torchpeer.experiments.runner import run_sweep
    from torchpeer.experiments.spec import load_spec

    spec = load_spec(args.spec)
    runs_dir = args.runs_dir or os.path.join("runs", spec.name)
    check_not_a_run_folder(runs_dir)
    try:
        with stop_on_signals() if not args.dry_run else contextlib.nullcontext():
            run_sweep(
                spec,
                runs_dir,
                only=args.only,
                dry_run=args.dry_run,
                progress=not args.no_progress,
                assume_tokens_per_s=args.assume_tokens_per_s,
                time_limit=args.time_limit,
                parallel=args.parallel,
                stop_at=args.stop_at,
                drop_checkpoints=args.drop_checkpoints,
                longest_first=args.longest_first,
                say=lambda s: print(s, flush=True),
            )
    except KeyboardInterrupt as e:  # Ctrl-C, or a run's TrainingInterrupted (SIGINT/SIGTERM)
        import sys

        signum = getattr(e, "signum", 2)
        print(
            f"interrupted: runs finished so far are in {os.path.join(runs_dir, 'results.jsonl')}; "
            f"to go on (finished runs are skipped, an interrupted one resumes): {continue_command(args, runs_dir)}",
            file=sys.stderr,
        )
        return 128 + signum
    if not args.dry_run:
        print(f"results: {os.path.join(runs_dir, 'results.jsonl')}; tables and figures: torchpeer report {runs_dir}")
    return 0
