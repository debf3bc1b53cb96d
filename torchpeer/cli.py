"""Command line: ``torchpeer train | eval | generate | info | data``.

Bad input (missing file, unknown config field or FFW kind, resume with another model, ...) is
reported as one line ``error: ...`` on stderr with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

TRAIN_EPILOG = """\
config overrides: any field as --SECTION.FIELD VALUE (or =VALUE), typed from the config, e.g.
  --model.d_model 512 --model.ffw dense --model.placement 3,7 --model.peer.n_experts 65536
  --train.max_steps 100 --train.max_flops 1e15 --train.device cpu
  --data.train 'corpus/*/train.jsonl.xz' --data.valid.mine path/valid.txt
  ('none' clears an optional field, e.g. --train.max_steps none --train.max_tokens 2e7)

examples:
  torchpeer train                                  # ptb-tiny: small PEER LM on PTB, CPU
  torchpeer train gpu-peer-small --run-dir runs/peer
  torchpeer train ptb-tiny --resume                # continue runs/ptb-tiny from its last checkpoint
"""


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate dotted config overrides (``--a.b V`` / ``--a.b=V``) from the other arguments."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            if "=" in a:
                overrides.append(a)
                i += 1
            else:
                overrides.extend(argv[i : i + 2])
                i += 2
            continue
        rest.append(a)
        i += 1
    return rest, overrides


def _config_with_overrides(name: str, overrides: list[str]):
    from torchpeer.lm.config import load_config

    return load_config(name, overrides)


def _named_sources(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--data {item!r}: give NAME=SOURCE, e.g. --data ptb=ptb:test")
        if name in out:
            raise ValueError(f"--data name {name!r} is given twice")
        out[name] = spec
    return out


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from torchpeer.lm.info import model_cost  # noqa: F401  (import errors surface early)
    from torchpeer.lm.train import train

    cfg = _config_with_overrides(args.config, args.overrides)
    run_dir = args.run_dir or os.path.join("runs", cfg.name or "run")
    print(f"config {cfg.name}: {cfg.model.ffw} FFW at blocks {cfg.model.sparse_blocks() or 'none'}, run dir {run_dir}")
    summary = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
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


def cmd_eval(args) -> int:
    from torchpeer.data import load_tokenizer, prepare_split
    from torchpeer.data.atomic import write_json_atomic
    from torchpeer.lm.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint
    from torchpeer.lm.evaluate import evaluate, format_results
    from torchpeer.lm.train import resolve_device

    device = resolve_device(args.device)
    model, cfg, ckpt = load_model_from_checkpoint(args.checkpoint, device)
    if args.cache_dir:
        cfg.data.cache_dir = args.cache_dir
    sets = _named_sources(args.data) or dict(cfg.data.valid)
    if not sets:
        raise ValueError("nothing to evaluate: the checkpoint's config has no valid sets; pass --data NAME=SOURCE")
    tok = load_checkpoint_tokenizer(ckpt) or load_tokenizer(cfg.data)
    dtype = None
    if device.type == "cuda" and cfg.train.dtype == "bf16":
        import torch

        dtype = torch.bfloat16
    results = {}
    for name, spec in sets.items():
        tf = prepare_split(cfg.data, spec, f"eval/{name}", tokenizer=tok, progress=not args.no_progress)
        bs = args.batch_size or cfg.train.eval_batch_size or cfg.train.batch_size
        results[name] = evaluate(model, tf, bs, cfg.model.seq_len, args.max_batches, device, dtype)
        results[name]["source"] = spec
    print(f"checkpoint {ckpt}")
    print(format_results(results))
    out = args.out
    if out is None:
        parent = os.path.dirname(ckpt)
        run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent
        out = os.path.join(run_dir, f"eval-{os.path.basename(ckpt)}.json")
    write_json_atomic(out, {"checkpoint": ckpt, "results": results})
    print(f"wrote {out}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from torchpeer.lm.checkpoint import load_checkpoint_tokenizer, load_model_from_checkpoint
    from torchpeer.lm.generate import generate
    from torchpeer.lm.train import resolve_device

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    device = resolve_device(args.device)
    model, cfg, ckpt = load_model_from_checkpoint(args.checkpoint, device)
    tok = load_checkpoint_tokenizer(ckpt)
    if tok is None:
        from torchpeer.data import load_tokenizer

        tok = load_tokenizer(cfg.data)
    ids = [tok.eot_id] + tok.encode(args.prompt)  # documents start after an end-of-text token
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(
        model,
        idx,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        gen,
        use_cache=not args.no_cache,
        stop_token=tok.eot_id if args.stop_at_eot else None,
    )
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + tok.decode(row[len(ids) :]))
    return 0


def infer_vocab_size(cfg) -> int:
    """model.vocab_size, or the tokenizer's (bpe: the configured target size) without training one."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    if cfg.data.tokenizer == "byte":
        from torchpeer.data import ByteTokenizer

        return ByteTokenizer.vocab_size
    if cfg.data.tokenizer == "bpe":
        return cfg.data.vocab_size
    from torchpeer.data import load_tokenizer

    return load_tokenizer(cfg.data).vocab_size


def cmd_info(args) -> int:
    from torchpeer.lm.info import config_cost, format_cost

    cfg = _config_with_overrides(args.config, args.overrides)
    cfg.model.vocab_size = infer_vocab_size(cfg)
    cost = config_cost(cfg.model)
    if args.json:
        print(json.dumps({"config": cfg.name, **cost.to_dict()}, indent=2))
        return 0
    print(f"config {cfg.name}")
    print(format_cost(cost, cfg.model))
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len
    from torchpeer.lm.train import plan_steps

    steps = plan_steps(cfg, cost.train_flops)
    print(
        f"training: {steps} steps x {tokens_per_step:,} tokens = {steps * tokens_per_step:,} tokens, "
        f"{steps * tokens_per_step * cost.train_flops:.3g} FLOPs"
    )
    return 0


def cmd_data(args) -> int:
    from torchpeer.data import run_data_subcommand
    from torchpeer.lm.config import resolve_config_path

    if getattr(args, "config", None):
        args.config = resolve_config_path(args.config)  # accept shipped names like ptb-tiny
    return run_data_subcommand(args)


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from torchpeer.data import add_data_subcommand
    from torchpeer.lm.config import DEFAULT_CONFIG, list_configs

    shipped = ", ".join(list_configs()) or "(none)"
    parser = argparse.ArgumentParser(
        prog="torchpeer",
        description="PEER (Mixture of A Million Experts) language-model toolkit.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "train",
        help="train a language model from a TOML config",
        description=f"Train a language model. CONFIG is a shipped config name ({shipped}) or a TOML path.",
        epilog=TRAIN_EPILOG,
        formatter_class=raw,
    )
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"config name or path (default {DEFAULT_CONFIG})")
    p.add_argument("--run-dir", help="run folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    p.set_defaults(func=cmd_train, takes_overrides=True)

    p = sub.add_parser(
        "eval",
        help="perplexity, bits per byte and expert usage of a checkpoint",
        description="Evaluate a checkpoint (a checkpoint folder, or a run folder: its latest checkpoint) "
        "on named sets: loss, perplexity per token, bits per byte, expert usage and KL; prints a "
        "table and writes JSON.",
        epilog="example:\n  torchpeer eval runs/ptb-tiny --data ptb=ptb:test --data valid=ptb:valid",
        formatter_class=raw,
    )
    p.add_argument("checkpoint", help="checkpoint folder or run folder")
    p.add_argument(
        "--data", action="append", metavar="NAME=SOURCE", help="eval set (repeatable); default: the config's valid sets"
    )
    p.add_argument("--batch-size", type=int, help="eval batch size (default: the config's)")
    p.add_argument("--max-batches", type=int, help="evaluate only the first N batches of each set")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--cache-dir", help="token cache folder (default: the config's data.cache_dir)")
    p.add_argument("--out", help="JSON output path (default RUN_DIR/eval-<checkpoint>.json)")
    p.add_argument("--no-progress", action="store_true", help="no tokenising progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "generate",
        help="sample text from a checkpoint",
        description="Sample text from a checkpoint with a KV cache. Temperature 0 is greedy decoding.",
        epilog='example:\n  torchpeer generate runs/ptb-tiny --prompt "the company said" --max-new-tokens 200',
        formatter_class=raw,
    )
    p.add_argument("checkpoint", help="checkpoint folder or run folder")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    p.add_argument("--stop-at-eot", action="store_true", help="stop at the end-of-text token")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "info",
        help="parameters, active parameters and FLOPs of a config",
        description="Total and active parameters and training FLOPs per token of a config's model, per "
        "block and in total (CONFIG and overrides as for train). FLOP conventions: multiply-add = 2, "
        "training = 3 x forward, attention scores 6*seq_len*d_model per layer, unembedding counted, "
        "embedding lookup not.",
        epilog="example:\n  torchpeer info gpu-peer-small --model.peer.n_experts 65536",
        formatter_class=raw,
    )
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"config name or path (default {DEFAULT_CONFIG})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info, takes_overrides=True)

    p = add_data_subcommand(sub)
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(rest)
        if overrides and not getattr(args, "takes_overrides", False):
            parser.error(f"config overrides ({overrides[0]} ...) only apply to train and info")
        args.overrides = overrides
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("TORCHPEER_TRACEBACK"):
            raise  # debugging: the full traceback instead of the one-line message
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
