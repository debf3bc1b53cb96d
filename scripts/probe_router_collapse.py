"""When does PEER's router collapse, and do the queries align when it does? (campaign.md Batch 22)

    python scripts/probe_router_collapse.py --out experiments/results/2026-12-07-router-collapse-cpu
    python scripts/probe_router_collapse.py --out DIR --seed 1 --set model.peer.query_norm=ema_white

CPU proxy of isoflop-lrw's peer-s2-1e15 (d_model 128, 4 layers, one PEER layer of 1024^2 experts,
h 8, k 16, lr 8e-3 with the same per-step warm-up ramp of 180 steps), at 16 x 512 tokens a step (the
GPU run's 64 x 512 is ~40 s a step here) on the corpus valid text. At a few steps it evaluates the
router on 2 batches of brown's valid text with full tracking: usage %, KL, the queries' effective rank
and participation ratio (diagnostics.routing), and the sub-keys' top-10 share. Writes probe.jsonl
(one line per probed step) and prints a table. ``--set key=value`` (repeatable) overrides OVERRIDES
or adds to them; ``--seed N`` sets train.seed (the config's 0 without it).
"""

from __future__ import annotations

import argparse
import json
import os

from torchpeer.lm import load_config, train
from torchpeer.lm.callbacks import Callback

OVERRIDES = {
    "model.ffw": "peer", "model.peer.n_experts": "1048576", "model.peer.heads": "8", "model.peer.top_k": "16",
    "model.peer.d_key": "128", "model.d_model": "128", "model.n_layers": "4", "model.n_heads": "2",
    "train.lr": "8e-3", "train.warmup_steps": "180", "train.batch_size": "16", "train.log_interval": "5",
    "train.track_usage": "true", "data.train": ".corpus/*/valid.jsonl.xz",
    "data.valid.corpus": ".corpus/brown/valid.jsonl.xz", "train.eval_interval": "1000000",
    "train.eval_batches": "2", "train.checkpoint": "false",
}  # fmt: skip
KEYS = ("usage_pct", "kl", "query_eff_rank", "query_participation", "subkey_top10_share_0", "subkey_top10_share_1")


class Probe(Callback):
    def __init__(self, steps: set[int], path: str):
        self.steps, self.path, self.loss = steps, path, None

    def _probe(self, trainer, step: int) -> None:
        routing = trainer.evaluate(max_batches=2)["corpus"]["routing"]
        rec = {"step": step, "train_loss": self.loss, **{k: routing["blocks.2.ffw"].get(k) for k in KEYS}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print("probe", json.dumps(rec), flush=True)

    def on_train_start(self, trainer) -> None:
        self._probe(trainer, 0)

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        self.loss = metrics.get("loss", self.loss)
        if step in self.steps:
            self._probe(trainer, step)


def main(make_probe=None, outputs: tuple[str, ...] = ("probe.jsonl",), doc: str = __doc__) -> None:
    """The probe's command line and run. ``make_probe(steps, out_dir)`` builds the callback (default:
    ``Probe`` writing OUT/probe.jsonl); ``outputs``: the files of OUT it writes, removed before a new
    run. scripts/probe_router_input.py runs its own probe through this."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", required=True, help=f"folder for {', '.join(outputs)} and the run")
    ap.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
    ap.add_argument("--probe", default="5,10,15,20,30,40", help="steps to probe besides 0")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override (repeatable)")
    ap.add_argument("--seed", type=int, help="train.seed (default: the config's)")
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)
    if args.seed is not None:
        extra["train.seed"] = str(args.seed)
    os.makedirs(args.out, exist_ok=True)
    for name in outputs:
        if os.path.exists(path := os.path.join(args.out, name)):
            os.remove(path)
    over = {**OVERRIDES, "train.max_steps": str(args.steps), **extra}
    cfg = load_config("gpu-dense-small", [a for k, v in over.items() for a in (f"--{k}", v)])
    steps = {int(s) for s in args.probe.split(",")}
    probe = (make_probe or (lambda st, out: Probe(st, os.path.join(out, "probe.jsonl"))))(steps, args.out)
    train(cfg, os.path.join(args.out, "run"), callbacks=[probe], progress=False)


if __name__ == "__main__":
    main()
