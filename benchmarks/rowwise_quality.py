"""Quality of the row-wise Adam rule vs AdamW for the expert tables, on the CPU (small scale).

The fused Triton optimizer needs a GPU; its rule is the spec torchpeer/optim/rowwise_adam.py, and
the fused kernel is tested to match that spec step for step (tests/ops/test_rowwise_adam.py). So
this script trains with the spec's plain-PyTorch form (RowwiseAdamW: row-wise rule for the PEER
tables, AdamW for the rest; tables excluded from gradient clipping, as in the fused path) and with
AdamW, same config, seeds and data, and compares the validation loss.

    python benchmarks/rowwise_quality.py --steps 150 --seeds 0 1     # ptb-tiny, ~minutes per run

Writes <out-dir>/rowwise_quality_<date>.json and .md. Small-scale evidence only: ptb-tiny
(N = 128^2 experts, 2k tokens per step), not the GPU configs at 30M tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from torchpeer.data.atomic import write_text_atomic  # noqa: E402


def run(config, optimizer, seed, steps, runs_dir):
    from torchpeer.lm import Trainer
    from torchpeer.lm.config_io import load_config
    from torchpeer.lm.optim import expert_parameters
    from torchpeer.optim import RowwiseAdamW

    overrides = [("train.seed", str(seed)), ("train.max_steps", str(steps)), ("train.checkpoint", "false"),
                 ("train.tensorboard", "false"), ("train.eval_interval", str(steps)),
                 ("train.device", "cpu")]  # fmt: skip
    cfg = load_config(config, overrides)
    trainer = Trainer(cfg, os.path.join(runs_dir, f"{optimizer}_s{seed}"), progress=False).build()
    if optimizer == "rowwise":
        t = cfg.train
        groups = [dict(g) for g in trainer.optimizer.param_groups]
        trainer.optimizer = RowwiseAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
        tables = expert_parameters(trainer.model)
        trainer.params = [p for p in trainer.params if id(p) not in tables]  # tables: not clipped
    t0 = time.perf_counter()
    summary = trainer.fit()
    valid = {k: v["loss"] for k, v in summary["valid"].items()}
    return {"optimizer": optimizer, "seed": seed, "steps": steps, "valid_loss": valid,
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="ptb-tiny")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    args = p.parse_args(argv)
    date = datetime.date.today().isoformat()
    result = {"date": date, "config": args.config, "steps": args.steps, "runs": []}
    stem = os.path.join(args.out_dir, f"rowwise_quality_{date}")
    os.makedirs(args.out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as runs_dir:
        for seed in args.seeds:
            for opt in ("adamw", "rowwise"):
                r = run(args.config, opt, seed, args.steps, runs_dir)
                result["runs"].append(r)
                print(json.dumps(r), flush=True)
                write_text_atomic(stem + ".json", json.dumps(result, indent=2) + "\n")
    lines = [f"# Row-wise Adam vs AdamW for the expert tables, {args.config}, {args.steps} steps, {date}", "",
             "| seed | optimizer | valid loss | seconds |", "| ---: | --- | --- | ---: |"]  # fmt: skip
    for r in result["runs"]:
        loss = ", ".join(f"{k} {v:.4f}" for k, v in r["valid_loss"].items())
        lines.append(f"| {r['seed']} | {r['optimizer']} | {loss} | {r['seconds']} |")
    write_text_atomic(stem + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
