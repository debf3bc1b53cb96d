"""A balance term on the sub-key marginals of a product-key router (PEER's ``balance_weight``).

The experts of a product-key layer are pairs (a, b) of sub-keys, one per query half. If the
routing uses few sub-keys of a half, it uses few experts, whatever the query norm does. The term
is Switch-Transformer style (Fedus et al. 2021), once per key set s and half c:

    f[s,c,j] = share of the selections (all tokens, heads of set s, top-k) whose half-c index is j
               (counted from the retrieved indices; no gradient)
    P[s,c,j] = mean over tokens (and the heads of set s) of softmax_j(q_c . C[s,c,j])
               (the soft marginal over all n sub-keys of the half; differentiable)
    loss     = n * mean_{s,c} sum_j f[s,c,j] * P[s,c,j]

Values: 1 when both marginals are uniform; n (its maximum: sum_j f_j P_j <= max_j P_j <= 1) when
every selection uses one sub-key and the softmax puts all its mass there. Over routings whose hard
counts follow the soft marginals (f = P) its minimum is 1, at uniform use (Cauchy-Schwarz). Its
gradient lowers the softmax mass of sub-keys in proportion to how often they are selected.

Why the sub-key marginals and not the N expert counts: the N-way soft marginal would need every
token's scores over all N experts; the sub-key scores are the 2*n per head the retrieval computes
anyway (here recomputed, for every ``stride``-th token, because the retrieval op does not return
them). The CPU proxy of the routing work (docs/research/routing.md) raised usage from 53 to 79 %
at weight 0.01 with no perplexity cost.
"""

from __future__ import annotations

import torch

from torchpeer.layers.accounting import TRAIN_FLOPS_MULTIPLIER, matmul_flops


def subkey_marginals(q: torch.Tensor, sub_keys: torch.Tensor, indices: torch.Tensor, stride: int = 1):
    """(f, P), each (S, 2, n) float32: hard selection shares and mean soft marginals (see module docstring).

    q: (T, H, d_key) queries as retrieved with; sub_keys: (S, 2, n, d_key // 2), S = 1 (shared by
    the heads) or H (one set per head); indices: (T, H, K) int64 expert ids a * n + b;
    stride: P is computed from tokens 0, stride, 2*stride, ... (f always from every token).
    """
    T, H, dk = q.shape
    S, _, n, m = sub_keys.shape
    if S not in (1, H) or dk != 2 * m:
        raise ValueError(f"queries (T, {H}, {dk}) do not fit sub-keys {tuple(sub_keys.shape)}")
    with torch.autocast(q.device.type, enabled=False):  # a softmax over n scores: fp32 at least
        cdt = torch.promote_types(q.dtype, torch.float32)
        qs = q[::stride].to(cdt).view(-1, H, 2, m)
        keys = sub_keys.to(cdt)
        if S == 1:
            p = torch.einsum("thcm,cnm->thcn", qs, keys[0]).softmax(-1).mean((0, 1)).unsqueeze(0)
        else:
            p = torch.einsum("thcm,hcnm->thcn", qs, keys).softmax(-1).mean(0)
    with torch.no_grad():
        halves = torch.stack((indices // n, indices % n), dim=-1)  # (T, H, K, 2)
        if S > 1:  # one histogram per head: offset head h's ids by h * n
            halves = halves + n * torch.arange(H, device=indices.device).view(1, H, 1, 1)
        flat = halves.reshape(-1, 2).transpose(0, 1)  # (2, T*H*K)
        counts = histogram(flat, S * n)  # (2, S*n)
        f = counts.view(2, S, n).transpose(0, 1).to(p.dtype)
        f = f / f.sum(-1, keepdim=True).clamp_min(1)
    return f, p


def histogram(values: torch.Tensor, bins: int) -> torch.Tensor:
    """(..., k) int64 in [0, bins) -> (..., bins) int64 counts of each row: torch.bincount's integers
    with a fixed output length. scatter_add, not bincount: bincount's length depends on the data, which
    breaks a torch.compile graph at every call (four breaks a PEER layer with the term, eight a
    token-choice MoE); int64 sums are exact and deterministic."""
    counts = torch.zeros(*values.shape[:-1], bins, dtype=torch.int64, device=values.device)
    return counts.scatter_add_(-1, values, torch.ones_like(values))


def subkey_balance_loss(q: torch.Tensor, sub_keys: torch.Tensor, indices: torch.Tensor, stride: int = 1):
    """n * mean_{s,c} sum_j f[s,c,j] P[s,c,j]: a scalar (float32), 1 when balanced, n when collapsed.
    Arguments as ``subkey_marginals``; differentiable w.r.t. q and sub_keys."""
    f, p = subkey_marginals(q, sub_keys, indices, stride)
    return sub_keys.shape[2] * (f * p).sum(-1).mean()


def balance_train_flops(heads: int, n_keys: int, d_key: int, stride: int) -> int:
    """Training FLOPs per token of the term: every ``stride``-th token re-scores the 2 * n_keys
    sub-keys of each head (forward 2 * heads * n_keys * d_key FLOPs), and its backward costs twice
    that (gradients of the queries and of the sub-keys); rounded up."""
    per_scored_token = TRAIN_FLOPS_MULTIPLIER * heads * 2 * matmul_flops(1, d_key // 2, n_keys)
    return -(-per_scored_token // stride)
