"""``torchpeer info [CONFIG] [--json]``: parameters, active parameters and FLOPs of a config."""

from __future__ import annotations

import json


def add_parser(subparsers):
    from torchpeer.cli.common import HelpFormatter
    from torchpeer.lm.config_io import DEFAULT_CONFIG

    p = subparsers.add_parser(
        "info",
        help="parameters, active parameters and FLOPs of a config",
        description="Total and active parameters and training FLOPs per token of a config's model, per "
        "block and in total (CONFIG and overrides as for train). FLOP conventions: multiply-add = 2, "
        "training = 3 x forward, attention scores 6*seq_len*d_model per layer, unembedding counted, "
        "embedding lookup not.",
        epilog="examples:\n  torchpeer info gpu-peer-small --model.peer.n_experts 65536\n"
        "  torchpeer info runs/ptb-tiny          # the model a run trained",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "config",
        nargs="?",
        default=DEFAULT_CONFIG,
        help=f"config name or TOML path (default {DEFAULT_CONFIG}), or a run, checkpoint or export-hf folder "
        "(the config it was saved with)",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of a table")
    out.add_argument(
        "--toml",
        action="store_true",
        help="print the config itself instead: every field and its value after the overrides, as TOML "
        "(unset ones as '# field = none'); save it to start a config of your own",
    )
    p.set_defaults(func=run, takes_overrides=True)
    return p


def run(args) -> int:
    from torchpeer.cli.common import config_with_overrides
    from torchpeer.cli.notes import infer_vocab_size
    from torchpeer.lm.budget import plan_steps
    from torchpeer.lm.info import config_cost, format_cost

    cfg = config_with_overrides(args.config, args.overrides)
    if args.toml:
        from torchpeer.lm.config_io import dump_toml

        print(dump_toml(cfg, show_unset=True), end="")
        return 0
    cfg.model.vocab_size = infer_vocab_size(cfg)
    cost = config_cost(cfg.model)
    if args.json:
        print(json.dumps({"config": cfg.name, **cost.to_dict()}, indent=2))
        return 0
    print(f"config {cfg.name}")
    print(format_cost(cost, cfg.model))
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len
    steps = plan_steps(cfg, cost.train_flops)
    print(
        f"training: {steps:,} steps x {tokens_per_step:,} tokens = {steps * tokens_per_step:,} tokens, "
        f"{steps * tokens_per_step * cost.train_flops:.3g} FLOPs"
    )
    from torchpeer.cli.notes import preempted_budget_note, unused_section_note

    for note in (preempted_budget_note(cfg, args.overrides), unused_section_note(cfg, args.overrides)):
        if note:  # as train says at its start
            print(note)
    return 0
