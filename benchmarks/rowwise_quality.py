"""Quality and routing health of the expert tables' optimizer, on the CPU (small scale).

The fused Triton optimizer needs a GPU; its rule is the spec torchpeer/optim/rowwise_adam.py, and
the fused kernel is tested to match that spec step for step (tests/ops/test_rowwise_adam.py). So
this script trains with the spec's plain-PyTorch form and with AdamW, same config, seeds and data,
and compares the validation loss and the PEER layers' expert usage and KL. Variants (--optimizers):

  adamw        torch AdamW for every parameter (the trainer's default; tables in the clipping)
  lazy_adamw   AdamW's per-element rule, but a table row changes only on steps whose gradient
               touches it (torchpeer.optim.SparseRowAdamW; global step count; tables clipped):
               AdamW minus the moves of idle rows along their old momentum
  lazy_adamw_bf16
               lazy_adamw whose table moments are stored in bf16 after each step: the first moment
               rounded to nearest, the second stochastically (round-to-nearest would lose
               (1 - beta2) = 0.1 % increments below bf16's half-ulp of 0.2 %): the state a fused
               element-wise kernel would keep at row-wise Adam's bytes (an experiment; no kernel has it)
  lazy_adamw_v16
               the same with only the second moment in bf16 (stochastic), the first in fp32
  rowwise      the fused optimizer's rule (RowwiseAdamW: lazy, one second moment per row, per-row
               step counts; tables not clipped, as in the fused path; train.expert_optimizer rowwise_adam*)
  elementwise  the same with one fp32 second moment per element (RowwiseAdamW(elementwise=True):
               lazy_adamw's rule with per-row step counts, unclipped tables; elementwise_adam*)
  elementwise_gstep
               elementwise with the global step count in the bias correction (lazy_adamw's) instead of
               per-row counts: which of its two differences from lazy_adamw costs (an experiment)
  rowwise_factored
               rowwise with a per-column factor on the row's second moment (Adafactor-like):
               v_ij = v_i * f_j, f = c / mean(c), c the table's EMA of the column means of g^2 over
               the selected rows (an experiment: one d-vector per table; no fused kernel has it)
  NAME:xK      the same with the expert tables' lr multiplied by K (e.g. rowwise:x3)

    python benchmarks/rowwise_quality.py --steps 500 --seeds 0 1 --optimizers adamw lazy_adamw rowwise
    # a design other than the config's: --set KEY=VALUE (config overrides, repeatable), --name to keep files apart
    python benchmarks/rowwise_quality.py --steps 900 --seeds 0 1 --optimizers rowwise --name tuned \
        --set model.placement=1,3 --set model.peer.shared_pool=true --set train.expert_weight_decay=1.0

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

OPTIMIZERS = (
    "adamw", "lazy_adamw", "lazy_adamw_bf16", "lazy_adamw_v16", "rowwise", "elementwise", "elementwise_gstep",
    "rowwise_factored",
)  # fmt: skip


def parse_variant(text: str) -> tuple[str, float]:
    """ "rowwise:x3" -> ("rowwise", 3.0); "adamw" -> ("adamw", 1.0)."""
    name, _, mult = text.partition(":x")
    if name not in OPTIMIZERS or (mult and not mult.replace(".", "", 1).isdigit()):
        raise ValueError(
            f"--optimizers takes {', '.join(OPTIMIZERS)}, each optionally with :xK (e.g. rowwise:x3); got {text!r}"
        )
    return name, float(mult) if mult else 1.0


def parse_set(items: list[str]) -> list[tuple[str, str]]:
    """["model.d_model=64", ...] -> [("model.d_model", "64"), ...]: the --set config overrides."""
    pairs = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set takes KEY=VALUE (e.g. --set train.expert_weight_decay=1.0); got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def lazy_adamw(groups, expert_ids, lr, betas, eps):
    """SparseRowAdamW whose step() finds the touched table rows itself (rows with a nonzero gradient),
    so the trainer can call it like AdamW; every other parameter takes the dense AdamW update."""
    from torchpeer.optim.sparse_adam import SparseRowAdamW

    class LazyAdamW(SparseRowAdamW):
        def step(self, closure=None):
            rows = {}
            for g in self.param_groups:
                for p in g["params"]:
                    if id(p) in expert_ids and p.grad is not None:
                        rows[p] = (p.grad != 0).any(dim=1).nonzero().squeeze(1)
            return super().step(rows=rows, closure=closure)

    return LazyAdamW(groups, lr=lr, betas=betas, eps=eps)


def round_bf16_(x, generator=None):
    """Round an fp32 tensor to bf16 values in place: to nearest, or stochastically (up with probability
    the dropped fraction of an ulp) when a generator is given. Values already in bf16 stay exact."""
    import torch

    if generator is None:
        x.copy_(x.bfloat16().float())
        return x
    bits = x.view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, dtype=torch.int32)
    x.copy_(((bits + noise) & ~0xFFFF).view(torch.float32))
    return x


def lazy_adamw_bf16(groups, expert_ids, lr, betas, eps, seed, first_moment=True):
    """lazy_adamw with the tables' moments kept in bf16 (first to nearest, second stochastically);
    first_moment=False: only the second moment in bf16."""
    import torch

    opt = lazy_adamw(groups, expert_ids, lr, betas, eps)
    gen = torch.Generator().manual_seed(1000 + seed)
    plain_step = opt.step

    def step(closure=None):
        loss = plain_step(closure=closure)
        with torch.no_grad():
            for p, st in opt.state.items():
                if id(p) in expert_ids and "exp_avg" in st:
                    if first_moment:
                        round_bf16_(st["exp_avg"])
                    round_bf16_(st["exp_avg_sq"], gen)
        return loss

    opt.step = step
    return opt


def factored_rowwise_adamw(groups, lr, betas, eps, rowwise_groups):
    """RowwiseAdamW whose per-row second moment is scaled per column: the denominator of element
    (i, j) is sqrt(v_i * f_j) with f = c / mean(c), c (d,) an EMA (global step count) of the column
    means of g^2 over the rows a step selects. A row-wise moment assumes a row's elements share one
    gradient scale; the down table's gradients are sums of x_t and the up table's of dy_t, whose
    channels need not share one, and f restores that scale per channel for one d-vector per table."""
    import torch

    from torchpeer.optim import RowwiseAdamW
    from torchpeer.optim.rowwise_adam import RowwiseAdamState

    class FactoredRowwiseAdamW(RowwiseAdamW):
        def _update_table(self, p, group):
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            st = self.state[p]
            if "rowwise" not in st:
                st["rowwise"] = RowwiseAdamState.zeros_like(p)
                st["col"] = torch.zeros(p.shape[1], dtype=torch.float64)
                st["col_t"] = 0
            s = st["rowwise"]
            rows = (p.grad != 0).any(dim=1).nonzero().squeeze(1)
            g = p.grad[rows].double()
            st["col_t"] += 1
            st["col"].mul_(b2).add_(g.pow(2).mean(dim=0), alpha=1 - b2)
            c = st["col"] / (1 - b2 ** st["col_t"])
            f = c / c.mean().clamp_min(1e-300)
            t = s.steps[rows].double() + 1
            m = b1 * s.exp_avg[rows].double() + (1 - b1) * g
            v = b2 * s.exp_avg_sq[rows].double() + (1 - b2) * g.pow(2).mean(dim=1)
            vhat = (v / (1 - b2**t))[:, None] * f[None, :]
            w = p[rows].double() * (1 - lr * wd) - lr * (m / (1 - b1**t)[:, None]) / (vhat.sqrt() + eps)
            p[rows] = w.to(p.dtype)
            s.exp_avg[rows], s.exp_avg_sq[rows], s.steps[rows] = m.float(), v.float(), t.to(torch.int32)

    return FactoredRowwiseAdamW(groups, lr=lr, betas=betas, eps=eps, rowwise_groups=rowwise_groups)


def global_step_elementwise_adamw(groups, lr, betas, eps, rowwise_groups):
    """RowwiseAdamW(elementwise=True) whose bias correction counts every step the table took (one
    count per table, as lazy_adamw), not each row's own updates: before each update every row's
    count is set to the table's, so the spec's t = count + 1 is the global step."""
    from torchpeer.optim import RowwiseAdamW

    class GlobalStepElementwise(RowwiseAdamW):
        def _update_table(self, p, group):
            st = self.state[p]
            st["t"] = st.get("t", 0) + 1
            if "rowwise" in st:
                st["rowwise"].steps.fill_(st["t"] - 1)
            super()._update_table(p, group)

    return GlobalStepElementwise(groups, lr=lr, betas=betas, eps=eps, rowwise_groups=rowwise_groups, elementwise=True)


def run(config, variant, seed, steps, runs_dir, extra=()):
    from torchpeer.lm import Trainer
    from torchpeer.lm.config_io import load_config
    from torchpeer.lm.optim import expert_parameters, is_expert_group
    from torchpeer.optim import RowwiseAdamW

    optimizer, lr_mult = parse_variant(variant)
    overrides = [("train.seed", str(seed)), ("train.max_steps", str(steps)), ("train.checkpoint", "false"),
                 ("train.tensorboard", "false"), ("train.eval_interval", str(steps)),
                 ("train.device", "cpu"), *extra]  # fmt: skip
    cfg = load_config(config, overrides)
    if lr_mult != 1.0:
        cfg.train.expert_lr = cfg.train.table_lr * lr_mult
    trainer = Trainer(cfg, os.path.join(runs_dir, f"{variant}_s{seed}".replace(":", "_")), progress=False).build()
    t = cfg.train
    tables = expert_parameters(trainer.model)
    groups = [dict(g) for g in trainer.optimizer.param_groups]
    if optimizer in ("rowwise", "elementwise", "elementwise_gstep", "rowwise_factored"):
        names = tuple(g["name"] for g in groups if is_expert_group(g))
        make = {"rowwise_factored": factored_rowwise_adamw, "elementwise_gstep": global_step_elementwise_adamw}
        make = make.get(optimizer, RowwiseAdamW)
        kw = {"elementwise": True} if optimizer == "elementwise" else {}
        trainer.optimizer = make(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, rowwise_groups=names, **kw)
        trainer.params = [p for p in trainer.params if id(p) not in tables]  # tables: not clipped
    elif optimizer == "lazy_adamw":
        trainer.optimizer = lazy_adamw(groups, tables, t.lr, (t.beta1, t.beta2), t.eps)
    elif optimizer in ("lazy_adamw_bf16", "lazy_adamw_v16"):
        both = optimizer == "lazy_adamw_bf16"
        trainer.optimizer = lazy_adamw_bf16(groups, tables, t.lr, (t.beta1, t.beta2), t.eps, seed, first_moment=both)
    t0 = time.perf_counter()
    summary = trainer.fit()
    valid = {k: v["loss"] for k, v in summary["valid"].items()}
    usage = {k: v.get("usage", {}) for k, v in summary["valid"].items()}
    return {"optimizer": variant, "seed": seed, "steps": steps, "valid_loss": valid, "usage": usage,
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="ptb-tiny")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--optimizers", nargs="+", default=["adamw", "rowwise"], help="variants (see above)")
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (repeatable), e.g. --set model.placement=1,3")  # fmt: skip
    p.add_argument("--name", default="", help="a suffix of the output files (rowwise_quality_<date>_<name>)")
    p.add_argument("--runs-dir", default=None, help="keep each run's folder here (default: a temporary one)")
    args = p.parse_args(argv)
    from torchpeer.lm.config_io import load_config

    try:  # a typo fails now, in one line, not after the first run
        for v in args.optimizers:
            parse_variant(v)
        extra = parse_set(args.set)
        load_config(args.config, extra)  # an unknown key or a bad value
    except (ValueError, TypeError) as e:
        p.error(str(e))
    date = datetime.date.today().isoformat()
    result = {"date": date, "config": args.config, "overrides": [f"{k}={v}" for k, v in extra],
              "steps": args.steps, "runs": []}  # fmt: skip
    stem = os.path.join(args.out_dir, f"rowwise_quality_{date}" + (f"_{args.name}" if args.name else ""))
    os.makedirs(args.out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        runs_dir = args.runs_dir or scratch
        for seed in args.seeds:
            for variant in args.optimizers:
                r = run(args.config, variant, seed, args.steps, runs_dir, extra)
                result["runs"].append(r)
                print(json.dumps(r), flush=True)
                write_text_atomic(stem + ".json", json.dumps(result, indent=2) + "\n")
    lines = [f"# The expert tables' optimizer: quality and usage, {args.config}, {args.steps} steps, {date}", "",
             f"Overrides: {' '.join(result['overrides']) or 'none'}.", "",
             "| seed | optimizer | valid loss | usage % / KL (per PEER layer) | seconds |",
             "| ---: | --- | --- | --- | ---: |"]  # fmt: skip
    for r in result["runs"]:
        loss = ", ".join(f"{k} {v:.4f}" for k, v in r["valid_loss"].items())
        first = next(iter(r["usage"].values()), {})
        use = ", ".join(f"{u['usage_pct']:.1f} / {u['kl']:.2f}" for u in first.values())
        lines.append(f"| {r['seed']} | {r['optimizer']} | {loss} | {use} | {r['seconds']} |")
    write_text_atomic(stem + ".md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
