"""``torchpeer train [CONFIG] [--run-dir DIR] [--resume] [--section.field VALUE ...]``."""

from __future__ import annotations

import os
import shlex
import sys

EPILOG = """\
config overrides: any field as --SECTION.FIELD VALUE (or =VALUE), typed from the config, e.g.
  --model.d_model 512 --model.ffw dense --model.placement 3,7 --model.peer.n_experts 65536
  --train.max_steps 100 --train.max_flops 1e15 --train.device cpu
  --data.train 'corpus/*/train.jsonl.xz' --data.valid.mine path/valid.txt
  ('none' clears an optional field, e.g. --train.max_steps none --train.max_tokens 2e7)

examples:
  torchpeer train                                  # ptb-tiny: small PEER LM on PTB, CPU
  torchpeer train gpu-peer-small --run-dir runs/peer
  torchpeer train ptb-tiny --resume                # continue runs/ptb-tiny from its last checkpoint

Ctrl-C (SIGINT) or SIGTERM stops after the current step, writes a checkpoint and prints the
command that resumes the run (exit status 130 / 143).
"""


def add_parser(subparsers):
    import argparse

    from torchpeer.lm.config_io import DEFAULT_CONFIG, list_configs

    p = subparsers.add_parser(
        "train",
        help="train a language model from a TOML config",
        description="Train a language model. CONFIG is a shipped config name "
        f"({', '.join(list_configs()) or '(none)'}) or a TOML path.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "config",
        nargs="?",
        default=DEFAULT_CONFIG,
        help=f"config name or path (default {DEFAULT_CONFIG}), or an export-hf folder to continue training",
    )
    p.add_argument("--run-dir", help="run folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=run, takes_overrides=True)
    return p


def resume_command(args, run_dir: str) -> str:
    """The command line that continues this run."""
    overrides = [f"--{k}={v}" for k, v in args.overrides]
    return shlex.join(["torchpeer", "train", args.config, "--run-dir", run_dir, "--resume", *overrides])


def run(args) -> int:
    from torchpeer.cli.common import _is_exported, config_with_overrides
    from torchpeer.lm.train import TrainingInterrupted, train

    init_from = None
    if _is_exported(args.config):  # an export-hf folder: continue training its model in a new run
        from torchpeer.hf.exported import continue_from_exported

        cfg, init_from = continue_from_exported(args.config, args.overrides)
    else:
        cfg = config_with_overrides(args.config, args.overrides)
    run_dir = args.run_dir or os.path.join("runs", cfg.name or "run")
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    if rank0:
        blocks = cfg.model.sparse_blocks() or "none"
        print(f"config {cfg.name}: {cfg.model.ffw} FFW at blocks {blocks}, run dir {run_dir}")
    try:
        summary = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress, init_from=init_from)
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
    if not rank0:
        return 0
    print(
        f"trained {summary['steps']} steps ({summary['tokens']:,} tokens, {summary['train_flops']:.3g} FLOPs) "
        f"in {summary['train_seconds'] / 60:.1f} min"
    )
    if summary["valid"]:
        from torchpeer.lm.evaluate import format_results

        print(format_results(summary["valid"]))
        for name, r in summary["valid"].items():
            print(f"validation perplexity ({name}): {r['ppl']:.2f} per token, {r['bpb']:.4f} bits per byte")
    return 0
