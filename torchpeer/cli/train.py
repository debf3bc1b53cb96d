"""``torchpeer train [CONFIG] [--run-dir DIR] [--resume] [--section.field VALUE ...]``."""

from __future__ import annotations

import json
import os
import shlex
import sys

EPILOG = """\
config overrides: any field as --SECTION.FIELD VALUE (or =VALUE), typed from the config, e.g.
  --model.d_model 512 --model.ffw dense --model.placement 3,7 --model.peer.n_experts 65536
  --train.max_steps 100 --train.max_flops 1e15 --train.device cpu
  --data.train 'corpus/*/train.jsonl.xz' --data.valid.mine path/valid.txt   (adds an eval set)
  --data.valid.ptb none   (removes an eval set)   --data.valid '{"mine": "path/valid.txt"}'   (only these)
  ('none' clears an optional field, e.g. --train.max_steps none --train.max_tokens 2e7)
  every field and its value: torchpeer info CONFIG --toml (the same overrides apply)

examples:
  torchpeer train                                  # ptb-tiny: small PEER LM on PTB, CPU
  torchpeer train gpu-peer-small --run-dir runs/peer
  torchpeer train ptb-tiny --resume                # continue runs/ptb-tiny from its last checkpoint
  torchpeer train --resume --run-dir runs/x --train.max_steps 1000   # ... with a larger budget
  torchpeer train runs/x --run-dir runs/x-seed1 --train.seed 1   # a new run with runs/x's config

--resume continues the run under the config it was saved with (its newest intact checkpoint's);
overrides given with --resume change that config, are printed, and the run folder keeps every
config it was trained under (RUN_DIR/configs/from_step_<N>.json). --resume of a run that had
already finished (its final evaluation recorded) trains and evaluates nothing and says which
setting to raise to train it further.

Ctrl-C (SIGINT) or SIGTERM stops after the current step, writes a checkpoint and prints the
command that resumes the run (exit status 130 / 143).
"""


def add_parser(subparsers):
    from torchpeer.cli.common import HelpFormatter
    from torchpeer.lm.config_io import DEFAULT_CONFIG, list_configs

    p = subparsers.add_parser(
        "train",
        help="train a language model from a TOML config",
        description="Train a language model. CONFIG is a shipped config name "
        f"({', '.join(list_configs()) or '(none)'}), a TOML path, a run or checkpoint folder (its saved "
        "config; give --run-dir for the new run, or --resume to continue a run folder) or an export-hf folder "
        "(a new run from its weights).",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "config",
        nargs="?",
        help=f"config name or TOML path (default {DEFAULT_CONFIG}); a run or checkpoint folder (its saved "
        "config), or an export-hf folder to continue training",
    )
    p.add_argument("--run-dir", help="run folder (default runs/<config name>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its newest intact checkpoint, under its saved config",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=run, takes_overrides=True)
    return p


def resume_command(args, run_dir: str) -> str:
    """The command line that continues this run."""
    overrides = [f"--{k}={v}" for k, v in args.overrides]
    config = [args.config] if args.config else []  # none named: the resume names none either (the run's own)
    return shlex.join(["torchpeer", "train", *config, "--run-dir", run_dir, "--resume", *overrides])


def config_for_resume(file_cfg, config_arg: str, run_dir: str, overrides, say=print):
    """(the config a resume continues with, the checkpoint it starts from): the run's saved config
    (its newest intact checkpoint's) with ``overrides`` applied. Says which fields the named config
    file would have set otherwise, so that an edited TOML file is not mistaken for the run's config."""
    from torchpeer.lm.config_io import apply_overrides
    from torchpeer.lm.resume import field_differences, saved_run_config

    saved, ckpt = saved_run_config(run_dir)
    cfg = apply_overrides(saved, overrides)
    cfg.validate()
    ours, theirs = cfg.to_dict(), file_cfg.to_dict()
    if theirs["model"]["vocab_size"] is None:  # resolved from the tokenizer when the run started
        theirs["model"]["vocab_size"] = ours["model"]["vocab_size"]
    theirs["name"] = ours["name"]
    diffs = field_differences(ours, theirs)
    if diffs:
        shown = "; ".join(f"{k} (run {a!r}, file {b!r})" for k, a, b in diffs[:6])
        more = f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""
        # model fields (the checkpoint's weights' shape) and the tokenizer: an override of one is refused on
        # resume, so none is the example
        changeable = [
            (k, v)
            for k, _, v in diffs
            if not isinstance(v, dict) and not k.startswith("model.") and k != "data.tokenizer"
        ]
        example = f", e.g. --{changeable[0][0]} {_as_flag(changeable[0][1])}" if changeable else ""
        fixed = " (model fields stay the checkpoint's)" if any(k.startswith("model.") for k, _, _ in diffs) else ""
        say(
            f"note: the run continues under its saved config; {config_arg} differs in {shown}{more}; "
            f"to change a field give it as an override{example}{fixed}"
        )
    return cfg, ckpt


def session_note(start: int | None, steps: int) -> str:
    """What a resumed run's totals leave out: how many of the steps this command trained."""
    if start is None:
        return ""
    if steps <= start:  # a finished run: the trainer's line above says how to train it further
        return " (the whole run, as recorded; this resume trained nothing)"
    done = f"step {steps}" if steps == start + 1 else f"steps {start + 1}-{steps}"
    return f" (the whole run; {done} in this session)"


def stopped_at_once(args, run_dir: str) -> str:
    """What a second signal, which does not wait for the current step's checkpoint, leaves: the
    latest checkpoint and the command that resumes from it, or that there is none."""
    from torchpeer.lm.checkpoint import latest_checkpoint

    head = "interrupted at once, without a checkpoint of the current step (a second Ctrl-C does not wait for it)"
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        anew = "start the run anew without --resume" if args.resume else "the same command starts the run anew"
        return f"{head}; {run_dir} holds no checkpoint: nothing to resume from ({anew})"
    return f"{head}; the latest checkpoint is {ckpt}\nresume with: {resume_command(args, run_dir)}"


def _as_flag(value) -> str:
    """A config value as override text (the parser reads str as is, the rest as JSON)."""
    return shlex.quote(value) if isinstance(value, str) else json.dumps(value)


def run(args) -> int:
    from torchpeer.cli.common import _is_exported, config_with_overrides
    from torchpeer.lm.checkpoint import checkpoint_step, latest_checkpoint
    from torchpeer.lm.config_io import DEFAULT_CONFIG
    from torchpeer.lm.rundir import check_new_run_folder, check_run_folder
    from torchpeer.lm.train import TrainingInterrupted, train
    from torchpeer.parallel.plan import plan_for_this_process

    config_arg = args.config or DEFAULT_CONFIG
    init_from = parent = None
    if _is_exported(config_arg):  # an export-hf folder: continue training its model in a new run
        from torchpeer.hf.export import read_origin
        from torchpeer.hf.exported import continue_from_exported

        cfg, init_from = continue_from_exported(config_arg, args.overrides)
        parent = read_origin(config_arg)  # where its weights stand: plots draw the new run after it
    else:
        cfg = config_with_overrides(config_arg, args.overrides)
    run_dir = args.run_dir or os.path.join("runs", cfg.name or "run")
    if os.path.isdir(config_arg) and init_from is None and not args.run_dir:  # a run or checkpoint folder
        is_run = os.path.isdir(os.path.join(config_arg, "checkpoints"))
        if is_run and args.resume:
            run_dir = config_arg  # `torchpeer train runs/x --resume` continues runs/x
        else:
            from torchpeer.lm.finished import finished_hint

            latest = latest_checkpoint(config_arg) if is_run else None
            if latest is not None and (done := finished_hint(config_arg, latest, cfg)):  # --resume alone: nothing
                raise ValueError(
                    f"{config_arg} is a run folder whose run {done}; to start a new run with its config, "
                    "add --run-dir NEW_FOLDER"
                )
            what, cont = "a run folder", f"torchpeer train {shlex.quote(config_arg)} --resume"
            if not is_run:
                run = os.path.dirname(os.path.dirname(os.path.normpath(config_arg))) or "."
                what, cont = "a checkpoint folder", f"torchpeer train --resume --run-dir {shlex.quote(run)}"
            raise ValueError(
                f"{config_arg} is {what}: to continue its run, {cont}; to start a new run with its config, "
                "add --run-dir NEW_FOLDER"
            )
    check_run_folder(run_dir)  # before config_for_resume reads the folder (the trainer checks again: Python callers)
    if not args.resume:  # (a resume of a folder that is no run says "nothing to resume")
        check_new_run_folder(run_dir)  # not into a project folder, a folder of runs, ...: nothing written yet
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    start = None  # the step a resume starts from
    if args.resume:
        say = print if rank0 else (lambda _: None)
        # no config named (`torchpeer train --resume --run-dir X`): no file to compare the run's config with
        quiet = args.config is None
        cfg, ckpt = config_for_resume(cfg, config_arg, run_dir, args.overrides, (lambda _: None) if quiet else say)
        start = checkpoint_step(ckpt)
    if rank0:
        from torchpeer.cli.notes import preempted_budget_note, unused_section_note

        blocks = cfg.model.sparse_blocks() or "none"
        print(f"config {cfg.name}: {cfg.model.ffw} FFW at blocks {blocks}, run dir {run_dir}")
        for note in (preempted_budget_note(cfg, args.overrides), unused_section_note(cfg, args.overrides)):
            if note:
                print(note)
    try:
        # torchpeer.parallel's plan: DistributedPlan under torchrun, else one process that also reads
        # a distributed run's checkpoints (the core, torchpeer.lm, does not import torchpeer.parallel)
        plan = plan_for_this_process()
        progress = not args.no_progress
        summary = train(
            cfg, run_dir, resume=args.resume, progress=progress, init_from=init_from, plan=plan, parent=parent
        )
    except TrainingInterrupted as e:
        if not rank0:
            return 128 + e.signum
        how = f"interrupted by {e.args[0]}"
        if e.checkpoint is not None:
            print(f"{how}; checkpoint {e.checkpoint}", file=sys.stderr)
            print(f"resume with: {resume_command(args, run_dir)}", file=sys.stderr)
        elif not cfg.train.checkpoint:
            print(f"{how}; checkpoints are off (train.checkpoint = false), nothing to resume from", file=sys.stderr)
        else:
            print(f"{how}, before the first step: nothing to resume from", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # a second Ctrl-C (or SIGTERM) stops at once: say what is left to resume
        if rank0:
            print(stopped_at_once(args, run_dir), file=sys.stderr)
        return 130
    if not rank0:
        return 0
    print(
        f"trained {summary['steps']} step{'s' * (summary['steps'] != 1)} ({summary['tokens']:,} tokens, "
        f"{summary['train_flops']:.3g} FLOPs) "
        f"in {summary['train_seconds'] / 60:.1f} min" + session_note(start, summary["steps"])
    )
    if summary["valid"]:
        from torchpeer.lm.evaluate import format_results

        print(format_results(summary["valid"]))
        for name, r in summary["valid"].items():
            print(f"validation perplexity ({name}): {r['ppl']:.2f} per token, {r['bpb']:.4f} bits per byte")
    return 0
