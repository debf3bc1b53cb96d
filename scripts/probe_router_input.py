"""scripts/probe_router_collapse.py, unchanged in training, plus read-only geometry diagnostics of the PEER
layer's input (block 2) and queries, written to OUT/input_stats.jsonl (beyond_paper.md, twenty-ninth session):

    python scripts/probe_router_input.py --out experiments/results/2026-12-07-router-collapse-cpu/frozen-router-batch \
        --set model.peer.query_norm=batch --set model.peer.key_lr_scale=1e-9 --set model.peer.query_lr_scale=1e-9

Same CLI as the script (--out, --steps, --probe, --set, --seed). The hooks only read detached tensors under
no_grad (no RNG, no state), so training is identical to the script's.

Per record (kind "train": averaged over the training forward(s) of that step; kind "eval": over the probe's
2 eval batches at that probe step):
  resid_*   : block 2's residual stream entering norm2 (raw),
  x_*       : the PEER input (rmsnorm(resid) * gain),
  qraw_*    : query_proj(x) before the query norm, per head (averaged over heads), full d_key,
  q_*       : normalised queries (what retrieval uses), per head and per half (averaged), d_key/2 each.
  *_mean_energy = |mean|^2 / mean |v|^2 (1: all rows identical up to noise; 0: centred),
  *_pr      = participation ratio of the CENTRED covariance (tr C)^2 / tr C^2,
  *_top1    = largest eigenvalue share of the centred covariance,
  *_pr_unc  = participation ratio of the UNCENTRED second moment E[v v^T] (what dot-product retrieval sees).
  src_<s>_share (thirtieth session): which sublayer writes the common vector. The residual entering
              block 2's norm2 is the sum of six writes, s in emb (token embedding), attn0, ffw0, attn1,
              ffw1, attn2 (no absolute position embedding: RoPE), so its token mean mu is the sum of
              theirs, mu_s, and share_s = <mu_s, mu> / |mu|^2 splits |mu|^2 exactly (the shares sum to
              1; one may be negative where a write opposes the rest). src_<s>_mean_energy: that write's own
              |mean|^2 / mean |v|^2.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling probe_router_collapse.py
from probe_router_collapse import Probe  # noqa: E402
from probe_router_collapse import main as probe_main  # noqa: E402


def rows(v: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (n, d) float64, detached."""
    return v.detach().reshape(-1, v.shape[-1]).double()


def mean_energy(v: torch.Tensor) -> float:
    """|mean row|^2 / mean |row|^2 of (n, d) float64 ``v``."""
    mu = v.mean(0)
    return float((mu @ mu) / (v * v).sum(1).mean())


def geom(v: torch.Tensor) -> dict:
    v = rows(v)
    n = v.shape[0]
    mu = v.mean(0)
    c = v - mu
    cov = c.T @ c / n
    m2 = v.T @ v / n
    ev = torch.linalg.eigvalsh(cov).clamp_min(0)
    ev2 = torch.linalg.eigvalsh(m2).clamp_min(0)
    return {
        "mean_energy": mean_energy(v),
        "pr": float(ev.sum() ** 2 / (ev * ev).sum()),
        "top1": float(ev.max() / ev.sum()),
        "pr_unc": float(ev2.sum() ** 2 / (ev2 * ev2).sum()),
    }


def avg(dicts: list[dict]) -> dict:
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in dicts[0]}


class DiagProbe(Probe):
    def __init__(self, steps, path, diag_path):
        super().__init__(steps, path)
        self.diag_path = diag_path
        self.buf = {"train": [], "eval": []}

    def _hook(self, trainer):
        block = trainer.model.blocks[2]
        router = block.ffw.router
        rec: dict = {}

        def on_norm2(mod, args):
            rec.clear()
            rec.update({f"resid_{k}": v for k, v in geom(args[0]).items()})

        def on_ffw(mod, args):
            rec.update({f"x_{k}": v for k, v in geom(args[0]).items()})

        def on_qnorm(mod, args, out):
            q_in, q = args[0].detach(), out.detach()  # (T, H, d_key)
            H, dk = q.shape[1], q.shape[2]
            rec.update({f"qraw_{k}": v for k, v in avg([geom(q_in[:, h]) for h in range(H)]).items()})
            halves = [geom(q[:, h, s * dk // 2 : (s + 1) * dk // 2]) for h in range(H) for s in range(2)]
            rec.update({f"q_{k}": v for k, v in avg(halves).items()})
            self.buf["train" if mod.training else "eval"].append(dict(rec))

        writes: dict = {}
        sources = {"emb": trainer.model.tok_emb}
        for i in range(3):
            sources[f"attn{i}"] = trainer.model.blocks[i].attn
            if i < 2:
                sources[f"ffw{i}"] = trainer.model.blocks[i].ffw

        def on_write(name, out):
            writes[name] = rows(out)

        def on_norm2_sources(resid):
            mu = rows(resid).mean(0)
            total = float(mu @ mu)
            for name in sources:
                v = writes.pop(name)
                rec[f"src_{name}_share"] = float(v.mean(0) @ mu) / total
                rec[f"src_{name}_mean_energy"] = mean_energy(v)

        for name, mod in sources.items():
            mod.register_forward_hook(lambda m, a, o, name=name: _ng(on_write, name, o))
        block.norm2.register_forward_pre_hook(lambda m, a: _ng(on_norm2, m, a))
        block.norm2.register_forward_pre_hook(lambda m, a: _ng(on_norm2_sources, a[0]))
        block.ffw.register_forward_pre_hook(lambda m, a: _ng(on_ffw, m, a))
        router.norm.register_forward_hook(lambda m, a, o: _ng(on_qnorm, m, a, o))

    def _write(self, kind, step):
        if self.buf[kind]:
            with open(self.diag_path, "a") as f:
                f.write(json.dumps({"kind": kind, "step": step, **avg(self.buf[kind])}) + "\n")
        self.buf[kind] = []

    def on_train_start(self, trainer):
        self._hook(trainer)
        self.buf["train"] = []
        super().on_train_start(trainer)

    def _probe(self, trainer, step):
        self.buf["eval"] = []
        super()._probe(trainer, step)
        self._write("eval", step)

    def on_step_end(self, trainer, step, metrics):
        self._write("train", step)
        super().on_step_end(trainer, step, metrics)


def _ng(fn, *a):
    with torch.no_grad():
        fn(*a)


def main(probe_cls: type[DiagProbe] = DiagProbe, doc: str = __doc__) -> None:
    """The probe's command line and run with ``probe_cls`` (DiagProbe or a subclass, e.g.
    scripts/probe_unigram_prior.py's), writing OUT/probe.jsonl and OUT/input_stats.jsonl."""
    probe_main(
        make_probe=lambda steps, out: probe_cls(
            steps, os.path.join(out, "probe.jsonl"), os.path.join(out, "input_stats.jsonl")
        ),
        outputs=("probe.jsonl", "input_stats.jsonl"),
        doc=doc,
    )


if __name__ == "__main__":
    main()
