"""``torchpeer eval CHECKPOINT [--data [NAME=]SOURCE ...]``: loss, perplexity, bits per byte, expert usage."""

from __future__ import annotations

import os


def add_parser(subparsers):
    from torchpeer.cli.common import HelpFormatter

    p = subparsers.add_parser(
        "eval",
        help="perplexity, bits per byte and expert usage of a checkpoint",
        description="Evaluate a checkpoint (a checkpoint folder, a run folder: its newest intact checkpoint, or an "
        "export-hf folder) "
        "on named sets: loss, perplexity per token, bits per byte, expert usage and KL; prints a "
        "table and writes JSON.",
        epilog="example:\n  torchpeer eval runs/ptb-tiny --data ptb=ptb:test --data valid=ptb:valid",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint folder, run folder or export-hf folder")
    p.add_argument(
        "--data",
        action="append",
        metavar="[NAME=]SOURCE",
        help="eval set (repeatable); a bare SOURCE is named after it, as by torchpeer data --valid (ptb:test -> "
        "ptb_test); default: the config's valid sets",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="sequences of seq_len tokens per batch (default: the config's train.eval_batch_size or batch_size)",
    )
    p.add_argument("--max-batches", type=int, help="evaluate only the first N batches of each set (default: all)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto: cuda if available)")
    p.add_argument("--cache-dir", help="token cache folder (default: the config's data.cache_dir)")
    p.add_argument(
        "--out",
        help="JSON output path (default RUN_DIR/eval-<checkpoint>.json; for an export-hf folder DIR, "
        "eval-DIR.json beside it); results of other sets already in it for the same checkpoint are kept",
    )
    p.add_argument("--no-progress", action="store_true", help="no tokenising or evaluating progress")
    p.set_defaults(func=run)
    return p


def default_out(ckpt: str) -> str:
    """RUN_DIR/eval-<checkpoint name>.json next to the run's checkpoints/ folder."""
    path = os.path.abspath(ckpt)  # 'step_N/' as shell completion writes it, or '.', names the folder too
    parent = os.path.dirname(path)
    run_dir = os.path.dirname(parent) if os.path.basename(parent) == "checkpoints" else parent
    out = os.path.join(run_dir, f"eval-{os.path.basename(path)}.json")
    return out if os.path.isabs(ckpt) else os.path.relpath(out)


def weights_id(ckpt: str) -> str | None:
    """SHA-256 of the checkpoint's checksums.json (which hashes every file of it): the same id means
    the same weights. None for a folder without one (an export, a checkpoint from older code)."""
    import hashlib

    from torchpeer.lm.integrity import MANIFEST

    try:
        with open(os.path.join(ckpt, MANIFEST), "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except OSError:
        return None


def earlier_results(out: str, given: bool = True) -> dict | None:
    """The record of an earlier ``torchpeer eval`` in ``out`` (None when there is no file). Any other
    file there (--out config.json by mistake; a damaged earlier result at the default path, ``given``
    False) is a ValueError: not ours to replace."""
    import json

    if not os.path.exists(out):
        return None
    try:
        with open(out, encoding="utf-8") as fh:
            earlier = json.load(fh)
    except (OSError, ValueError, UnicodeDecodeError):
        earlier = None
    if not (isinstance(earlier, dict) and isinstance(earlier.get("results"), dict) and "checkpoint" in earlier):
        if not given:  # the user gave no --out: name the file as eval's own and the ways out
            raise ValueError(
                f"{out}, where eval writes its results, exists and is not a 'torchpeer eval' result file (damaged "
                "or replaced?); it was left as it is: move it aside, or give --out a new path"
            )
        raise ValueError(f"--out {out} exists and is not a 'torchpeer eval' result file; give a new path")
    return earlier


def with_earlier_results(earlier: dict | None, record: dict) -> tuple[dict, list[str]]:
    """``record`` plus the sets of an ``earlier`` eval of the same weights that this one did not
    evaluate again (so that evaluating the test set, then the valid set, keeps both); returns the
    record to write and the names of the sets kept. Another checkpoint's record is replaced."""
    if earlier is None or earlier.get("checkpoint") != record["checkpoint"]:
        return record, []
    if record.get("weights") is None or earlier.get("weights") != record["weights"]:
        return record, []
    old = earlier["results"]
    kept = [name for name in old if name not in record["results"]]
    return {**record, "results": {**{k: old[k] for k in kept}, **record["results"]}}, kept


def run(args) -> int:
    from torchpeer.cli.common import load_for_inference, named_sources
    from torchpeer.data import prepare_split
    from torchpeer.data.atomic import write_json_atomic
    from torchpeer.data.sources import check_sources
    from torchpeer.lm.evaluate import evaluate, format_results, format_routing
    from torchpeer.lm.rundir import check_writable, writing
    from torchpeer.lm.runtime import autocast_dtype, resolve_device

    for name in ("batch_size", "max_batches"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = resolve_device(args.device, "--device")
    if args.out and os.path.isdir(args.out):
        example = os.path.join(args.out, "eval.json")
        raise ValueError(f"--out {args.out} is a folder; give a JSON file path, e.g. {example}")
    model, cfg, ckpt, tok = load_for_inference(args.checkpoint, device)
    if args.cache_dir:
        cfg.data.cache_dir = args.cache_dir
    sets = named_sources(args.data) or dict(cfg.data.valid)
    if not sets:
        raise ValueError("nothing to evaluate: the checkpoint's config has no valid sets; pass --data NAME=SOURCE")
    flag = "--data " if args.data else "data.valid."  # every set's files exist, before the first is evaluated
    check_sources({f"{flag}{name}": spec for name, spec in sets.items()})
    out = args.out or default_out(ckpt)
    what = "--out folder" if args.out else "run folder"  # the default output goes into the run folder
    check_writable(os.path.dirname(os.path.abspath(out)), what, "--out")  # fail before evaluating, not after
    earlier = earlier_results(out, given=bool(args.out))  # likewise a file there that is not an earlier eval's
    dtype = autocast_dtype(device, cfg.train.dtype)
    bs = args.batch_size or cfg.train.eval_batch_size or cfg.train.batch_size
    results = {}
    for name, spec in sets.items():
        tf = prepare_split(cfg.data, spec, f"eval/{name}", tokenizer=tok, progress=not args.no_progress)
        shown = None if args.no_progress else name
        results[name] = evaluate(model, tf, bs, cfg.model.seq_len, args.max_batches, device, dtype, progress=shown)
        results[name]["source"] = spec
    print(f"checkpoint {ckpt}")
    print(format_results(results))
    if any(r.get("routing") for r in results.values()):
        print(format_routing(results))
    record, kept = with_earlier_results(earlier, {"checkpoint": ckpt, "weights": weights_id(ckpt), "results": results})
    with writing(out):
        write_json_atomic(out, record)
    print(f"wrote {out}" + (f" (with the earlier results of {', '.join(kept)}, same checkpoint)" if kept else ""))
    return 0
