"""Train several LM configs on the same data for the same number of tokens and compare them.

Used for the PEER-vs-dense run on one GPU: each config is trained by `torchpeer train` in its own
process (so one run's memory does not affect the next), then this script collects training
throughput (median tokens/s of the logged intervals, training only: evaluation is excluded) and the
final validation loss / perplexity / bits per byte / expert usage from each run's summary.json.

    python benchmarks/lm_compare.py gpu-dense-small gpu-peer-small --out-dir benchmarks/results \\
        -- --data.train '.corpus/*/train.jsonl.xz' --data.valid.corpus '.corpus/*/valid.jsonl.xz'

Everything after `--` is passed to every `torchpeer train` call (config overrides). Writes
<out-dir>/lm_<date>.json and .md; run folders go to --runs-dir.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from torchpeer.data.atomic import write_text_atomic  # noqa: E402
from torchpeer.jsonl import write_xz_copy  # noqa: E402


def read_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    rates = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            if "tok_per_s" in rec and rec.get("step", 0) > 0:
                rates.append(rec["tok_per_s"])
    # The first interval includes compilation and warm-up; leave it out when there are others.
    steady = rates[1:] if len(rates) > 1 else rates
    return {
        "config": summary["name"],
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "total_params": summary["total_params"],
        "active_params": summary["active_params"],
        "train_flops": summary["train_flops"],
        "train_seconds": summary["train_seconds"],
        "tokens_per_s": round(statistics.median(steady), 1) if steady else None,
        "valid": summary["valid"],
    }


def markdown(result: dict) -> str:
    lines = [
        f"# LM comparison, {result['date']}",
        "",
        f"Device: {result['device']}; torch {result['torch']}; triton {result['triton']}.",
        f"Overrides: `{' '.join(result['overrides'])}`",
        "",
        "| config | total params | active params | tokens | tokens/s | valid set | loss | ppl | bits/byte"
        " | usage % | KL |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["runs"]:
        for name, v in r["valid"].items():
            usage = next(iter(v.get("usage", {}).values()), {})
            u = f"{usage['usage_pct']:.1f}" if usage else "-"
            kl = f"{usage['kl']:.3f}" if usage else "-"
            lines.append(
                f"| {r['config']} | {r['total_params']:,} | {r['active_params']:,} | {r['tokens']:,} | "
                f"{r['tokens_per_s']:,.0f} | {name} | {v['loss']:.4f} | {v['ppl']:.2f} | {v['bpb']:.4f} | {u} | {kl} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", help="config names or TOML paths, trained in this order")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--runs-dir", default="runs/lm_compare")
    p.add_argument(
        "--copy-metrics",
        action="store_true",
        help="copy each run's metrics.jsonl into --out-dir, xz-compressed (<config>_metrics.jsonl.xz: "
        "~4x smaller; torchpeer's readers take .xz)",
    )
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    date = datetime.date.today().isoformat()
    result = {
        "date": date,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "overrides": overrides,
        "runs": [],
    }
    for cfg in args.configs:
        run_dir = os.path.join(args.runs_dir, os.path.splitext(os.path.basename(cfg))[0])
        cmd = [sys.executable, "-m", "torchpeer.cli", "train", cfg, "--run-dir", run_dir, "--no-progress", *overrides]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        result["runs"].append(read_run(run_dir))
        if args.copy_metrics:
            write_xz_copy(os.path.join(run_dir, "metrics.jsonl"), os.path.join(args.out_dir, f"{cfg}_metrics.jsonl.xz"))
        stem = os.path.join(args.out_dir, f"lm_{date}")
        write_text_atomic(stem + ".json", json.dumps(result, indent=2) + "\n")
        write_text_atomic(stem + ".md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
