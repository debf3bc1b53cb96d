"""Evaluation: loss, perplexity and bits per byte on token files, plus expert usage and KL.

For a split of ``n`` tokens evaluated in full, every token after the first is a target once
(``sequential_windows``), so

    loss = total_nats / n_targets,   perplexity = exp(loss),   bpb = total_nats / (n_bytes * ln 2)

with ``n_bytes`` the UTF-8 bytes of the split's documents. When only the first ``max_batches``
are evaluated, ``n_bytes`` is scaled by the fraction of targets seen (``complete`` is False).
Routed layers (PEER, PKM, MoE) track expert usage during evaluation only. When several PEER layers
read one shared expert pool (``PEERConfig.shared_pool``), the pool's usage over all of them (the
union of their selections, ``pool_usage_report``) is reported besides each layer's.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from torchpeer.diagnostics import restore_trackers, save_trackers
from torchpeer.layers.expert_pool import pool_usage_report
from torchpeer.usage import enable_usage_tracking, routing_report, usage_report


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    token_file,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = None,
    plan=None,
    progress: str | None = None,
) -> dict:
    """Evaluate ``model`` on a TokenFile (anything with ``.tokens`` and ``.n_bytes``).

    plan: a parallel plan (lm/plan.py); each rank evaluates its share of the batches and the sums
    are reduced over ranks. None = one process.
    progress: a name to show a progress bar under (on a terminal; elsewhere one line says that the
    set is being evaluated); None = silent.
    Returns {"loss", "ppl", "bpb", "tokens", "complete", "usage": {layer: {"usage_pct", "kl"}},
    "routing": {layer: {metric: value}}, "pool_usage": {pool: {"usage_pct", "kl", "layers"}}}
    (usage and routing: routed layers only; pool_usage: shared expert pools only, e.g.
    "ffw_shared"). Each pool's entry is also in "routing" under the pool's name, so that records
    which keep only the routing statistics (the sweeps' results.jsonl) keep it; "usage" stays
    per layer (averages over its entries are averages over layers).
    """
    from torchpeer.data import sequential_windows
    from torchpeer.lm.plan import SingleProcessPlan

    plan = plan or SingleProcessPlan()
    device = torch.device(device)
    was_training = model.training
    model.eval()
    saved = save_trackers(model)  # a training window's (train.track_usage): back when this ends
    tracked = enable_usage_tracking(model, True)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # total nats, number of targets
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    bar = _progress_bar(progress, token_file, batch_size, seq_len, max_batches)
    try:
        batches = sequential_windows(token_file.tokens, batch_size, seq_len, max_batches=max_batches)
        for x, y in plan.shard_batches(batches):
            x, y = x.to(device), y.to(device)
            with ctx:
                logits, _ = model(x)
            sums[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
            sums[1] += y.numel()
            bar.update(y.numel())
        plan.all_reduce_sum_(sums)
        if tracked:
            plan.reduce_usage_(model)
        usage = usage_report(model) if tracked else {}
        routing = routing_report(model) if tracked else {}
        pools = pool_usage_report(model) if tracked else {}
        routing.update((name, dict(u)) for name, u in pools.items())
    finally:
        bar.close()
        restore_trackers(saved)
        model.train(was_training)
    nats, n_targets = sums[0].item(), int(sums[1].item())
    all_targets = len(token_file.tokens) - 1
    loss = nats / max(1, n_targets)
    n_bytes = token_file.n_bytes * n_targets / all_targets
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpb": nats / (n_bytes * math.log(2)) if n_bytes > 0 else float("nan"),
        "tokens": n_targets,
        "complete": n_targets == all_targets,
        "usage": usage,
        "routing": routing,
        "pool_usage": pools,
    }


def _progress_bar(name: str | None, token_file, batch_size: int, seq_len: int, max_batches: int | None):
    """A tqdm bar counting target tokens (disabled when ``name`` is None); not on a terminal, one
    line "evaluating NAME (N tokens) ..." instead, as tokenising does."""
    from tqdm.auto import tqdm

    total = len(token_file.tokens) - 1
    if max_batches is not None:
        total = min(total, max_batches * batch_size * seq_len)
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"evaluating {name}", disable=None if name else True)
    if name and bar.disable:
        print(f"evaluating {name} ({total:,} tokens) ...", flush=True)
    return bar


def format_results(results: dict[str, dict]) -> str:
    """Table of {set name: evaluate() result}, one row per set and routed layer, then one per shared
    expert pool ("<pool> (pool of <n> layers)": the union over the layers that read it)."""
    rows = [("set", "tokens", "loss", "ppl", "bpb", "layer", "usage %", "KL")]
    for name, r in results.items():
        base = (name, f"{r['tokens']:,}", f"{r['loss']:.4f}", f"{r['ppl']:.2f}", f"{r['bpb']:.4f}")
        pools = [(f"{pool} (pool of {u['layers']} layers)", u) for pool, u in (r.get("pool_usage") or {}).items()]
        layers = list(r["usage"].items()) + pools or [("", None)]
        for j, (layer, u) in enumerate(layers):
            cells = base if j == 0 else ("",) * 5
            extra = (layer, f"{u['usage_pct']:.2f}", f"{u['kl']:.4f}") if u else ("", "", "")
            rows.append(cells + extra)
    if not any(r[5] for r in rows[1:]):  # no routed layer (a dense model): no empty usage columns
        rows = [r[:5] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_routing(results: dict[str, dict]) -> str:
    """The routing statistics (diagnostics.routing_report) as a small table: one row per statistic,
    one column per eval set and routed layer (usage % and KL are in format_results' table)."""
    columns = [
        (f"{name} {layer}", stats)
        for name, r in results.items()
        for layer, stats in r.get("routing", {}).items()
        if layer not in (r.get("pool_usage") or {})  # a pool has usage % and KL only: format_results shows them
    ]
    if not columns:
        return ""
    shown = {"usage_pct", "kl"}
    metrics = sorted(
        {k for _, stats in columns for k, v in stats.items() if isinstance(v, (int, float)) and k not in shown}
    )
    rows = [("routing", *[title for title, _ in columns])]
    rows += [(m, *[_num(stats.get(m)) for _, stats in columns]) for m in metrics]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _num(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"
