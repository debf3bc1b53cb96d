"""Sub-keys initialised from the data's queries (``PEERConfig.key_init = "queries"``).

Random sub-keys ~ N(0, 1/d_key) point in directions the queries may never take: trained queries
are anisotropic (routing.md: participation ratio 7-28 of 64 per half), so many random keys start
far from every query and the few near the query cloud win the top-k (the "rich get richer"
start of a collapse). Here each sub-key of each half is set, once, to the direction of one query
half of the first training batch (distinct samples), keeping the random init's norm
(sqrt((d_key/2) / d_key)) so that the score scale, and so the softmax gates, start as before.

"The queries" are those the router's norm presents once it has seen the batch: a batch-statistics
norm ("batch") or a running-statistics one ("ema", "ema_white", whose value at the first step
would still use the initial statistics) standardises or whitens them with this batch's statistics;
per-token norms give their output. This is computed on a copy of the norm: the router's running
statistics are untouched. Under torch.distributed the keys are broadcast from rank 0, so every
rank starts from the same ones.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from torchpeer.layers.query_norm import _EMAStats

KEY_INITS = ("random", "queries")


@torch.no_grad()
def data_queries(router, x: torch.Tensor) -> torch.Tensor:
    """Queries (T, heads, d_key) float32 of x (T, d_model) as the router's norm presents them after
    one update with this batch (see the module docstring); the router's state is not changed."""
    with torch.autocast(x.device.type, enabled=False):
        w = router.query_proj.weight
        z = router.query_proj(x.to(w.dtype)).view(-1, router.heads, router.d_key)
        norm = copy.deepcopy(router.norm).train()
        if isinstance(norm, _EMAStats):
            norm.num_updates.zero_()  # the first update takes the batch's statistics in full
            norm(z)
            norm.eval()  # the value from those statistics
        return norm(z).float()


@torch.no_grad()
def init_sub_keys_from_queries(router, x: torch.Tensor) -> None:
    """Set ``router.sub_keys`` (S, 2, n, m) from the queries of x (T, d_model): for each key set
    and half, n distinct query halves (of the heads using that set) picked at random, scaled to
    norm sqrt(m / d_key). With fewer than n query halves, the remaining sub-keys keep their values."""
    q = data_queries(router, x)
    keys = router.sub_keys
    S, _, n, m = keys.shape
    halves = q.view(q.shape[0], router.heads, 2, m)
    scale = math.sqrt(m / router.d_key)  # the expected norm of a random N(0, 1/d_key) sub-key
    for s in range(S):
        pool = halves.reshape(-1, 2, m) if S == 1 else halves[:, s]  # (samples, 2, m)
        for c in range(2):
            pick = torch.randperm(pool.shape[0], device=pool.device)[:n]
            keys[s, c, : len(pick)] = (F.normalize(pool[pick, c], dim=-1) * scale).to(keys.dtype)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.broadcast(keys.data, src=0)
