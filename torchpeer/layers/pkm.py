"""Product-Key Memory baseline (Lample et al. 2019, "Large Memory Layers with Product Keys").

A memory of N = n_keys**2 value vectors, addressed by product keys. Per token and head h:

    q_h = norm(W_q x)_h                       (heads, d_key) query, BatchNorm by default (Lample)
    scores, idx = top_k over all N keys of q_h . key_i, key_i = [C_h[a] ; C'_h[b]], i = a*n_keys + b
    w = softmax(scores) over the k retrieved memories
    y = sum_h sum_k w[h, k] * values[idx[h, k]]

Unlike PEER (whose heads share one key set and whose experts are single neurons with an
activation), every PKM head has its own sub-key tables, the heads share one value table, and a
"memory" is a plain value vector (no input-dependent activation). The exact top-k over N keys is
``torchpeer.product_keys.product_key_topk``; the weighted value sum is
``F.embedding_bag(mode="sum", per_sample_weights=w)``, so the (tokens, heads, k, value_dim)
gathered rows are never materialised.

Default d_key = 256 (two sub-keys of 128 per head). Lample et al. use d_key = 512 (sub-keys of
256) for a 1024-wide model; we halve it because the retrieval cost 2 * heads * n_keys * d_key per
token (8 heads, 1024 sub-keys: 4.2 MFLOPs at 256) is already the largest term at the model widths
studied here, while 128-dimensional sub-keys still separate 1024 sub-keys comfortably.

Initialisation: sub-keys ~ N(0, 1 / d_key), so with normalised (unit-variance) queries each full
score has about unit variance and the softmax over the top-k starts neither flat nor one-hot;
values ~ N(0, 1 / value_dim) as in Lample et al.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchpeer.layers.accounting import FFWCost, count_params, matmul_flops
from torchpeer.layers.registry import register_ffw
from torchpeer.layers.validators import check_last_dim, check_positive
from torchpeer.product_keys import product_key_topk
from torchpeer.usage import UsageTrackingMixin

QUERY_NORMS = ("batch", "layer", "none")


@dataclass
class PKMConfig:
    """Options of ``PKM`` (the ``[model.pkm]`` config section; None = the module's default:
    d_key 256, value_dim d_model)."""

    n_keys: int = 1024
    heads: int = 8
    top_k: int = 32
    d_key: int | None = None
    query_norm: str = "batch"
    value_dim: int | None = None


class PKM(UsageTrackingMixin, nn.Module):
    """Product-key memory layer.

    Args:
        d_model: input and output width.
        n_keys: sub-keys per half and head; the memory holds N = n_keys**2 values.
        heads: number of query heads H (each with its own sub-keys; values are shared).
        top_k: memories retrieved per head (<= n_keys).
        d_key: query / full key width (even; each sub-key is d_key // 2 wide).
        query_norm: "batch" (BatchNorm1d over the H * d_key query features, Lample et al.),
            "layer" (LayerNorm over each head's d_key query) or "none".
        value_dim: width of a value vector (default d_model); when different, a bias-free
            Linear(value_dim, d_model) maps the memory read back to d_model.

    Attributes: ``sub_keys`` (H, 2, n_keys, d_key // 2), ``values`` (N, value_dim),
    ``query_proj`` Linear(d_model, H * d_key), ``norm``, ``out_proj`` (None unless value_dim != d_model).
    """

    def __init__(
        self,
        d_model: int,
        n_keys: int = 1024,
        heads: int = 8,
        top_k: int = 32,
        d_key: int = 256,
        query_norm: str = "batch",
        value_dim: int | None = None,
    ):
        super().__init__()
        value_dim = d_model if value_dim is None else value_dim
        check_positive(d_model=d_model, n_keys=n_keys, heads=heads, top_k=top_k, d_key=d_key, value_dim=value_dim)
        if d_key % 2:
            raise ValueError(f"d_key must be even (two sub-keys of d_key // 2), got {d_key}")
        if top_k > n_keys:
            raise ValueError(f"top_k={top_k} must be <= n_keys={n_keys} (product-key retrieval limit)")
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"unknown query_norm {query_norm!r}; use one of {QUERY_NORMS}")
        self.d_model, self.n_keys, self.heads, self.top_k = d_model, n_keys, heads, top_k
        self.d_key, self.query_norm, self.value_dim = d_key, query_norm, value_dim
        self.n_experts = n_keys * n_keys  # for UsageTrackingMixin: one "expert" per memory slot

        self.query_proj = nn.Linear(d_model, heads * d_key, bias=True)
        if query_norm == "batch":
            self.norm = nn.BatchNorm1d(heads * d_key)
        elif query_norm == "layer":
            self.norm = nn.LayerNorm(d_key)
        else:
            self.norm = None
        self.sub_keys = nn.Parameter(torch.randn(heads, 2, n_keys, d_key // 2) / math.sqrt(d_key))
        self.values = nn.Parameter(torch.randn(n_keys * n_keys, value_dim) / math.sqrt(value_dim))
        self.out_proj = nn.Linear(value_dim, d_model, bias=False) if value_dim != d_model else None

    @classmethod
    def from_config(cls, d_model: int, cfg: PKMConfig) -> PKM:
        return cls(d_model, **{k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_model) -> normalised queries (..., heads, d_key)."""
        check_last_dim(x, self.d_model)
        lead = x.shape[:-1]
        q = self.query_proj(x.reshape(-1, self.d_model))  # (T, H * d_key)
        if self.query_norm == "batch":
            q = self.norm(q)  # statistics over the tokens of the call (running stats in eval)
        q = q.view(-1, self.heads, self.d_key)
        if self.query_norm == "layer":
            q = self.norm(q)
        return q.view(*lead, self.heads, self.d_key)

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., d_model) -> (scores, indices), each (..., heads, top_k), best first.

        scores are float32 (float64 for float64 inputs) and differentiable; indices int64 in [0, N).
        """
        q = self.query(x)
        lead = q.shape[:-2]
        scores, indices = product_key_topk(q.reshape(-1, self.heads, self.d_key), self.sub_keys, self.top_k)
        return scores.view(*lead, self.heads, self.top_k), indices.view(*lead, self.heads, self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_model) -> (..., d_model)."""
        lead = x.shape[:-1]
        scores, indices = self.retrieve(x)
        T, hk = scores[..., 0, 0].numel(), self.heads * self.top_k
        weights = F.softmax(scores, dim=-1)  # (..., H, k) fp32 (fp64 for fp64 input), per head over its k
        self._track_usage(indices, weights)
        # Weighted sum over all heads' memories in one bag per token: never builds (T, H, k, value_dim).
        y = F.embedding_bag(
            indices.reshape(T, hk),
            self.values,
            per_sample_weights=weights.reshape(T, hk).to(self.values.dtype),
            mode="sum",
        )  # (T, value_dim)
        if self.out_proj is not None:
            y = self.out_proj(y)
        return y.to(x.dtype).view(*lead, self.d_model)

    def cost(self) -> FFWCost:
        """Per token: query projection, all sub-key scores (both halves, every head), H*k value rows.

        FLOPs: 2*d*H*d_key (query) + 2*H*2*n_keys*(d_key/2) (sub-key scores) + 2*H*k*value_dim
        (weighted value sum) [+ 2*value_dim*d_model (output projection)]. Active parameters: the
        query network (projection + norm), every sub-key, H*k value rows [+ output projection].
        """
        d, H, dk, n, k, v = self.d_model, self.heads, self.d_key, self.n_keys, self.top_k, self.value_dim
        query_params = count_params(self.query_proj) + (count_params(self.norm) if self.norm is not None else 0)
        out_params = count_params(self.out_proj) if self.out_proj is not None else 0
        flops = matmul_flops(1, d, H * dk) + H * 2 * matmul_flops(1, dk // 2, n) + H * matmul_flops(1, k, v)
        if self.out_proj is not None:
            flops += matmul_flops(1, v, d)
        return FFWCost(
            total_params=count_params(self),
            active_params=query_params + self.sub_keys.numel() + H * k * v + out_params,
            forward_flops=flops,
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_keys={self.n_keys} (N={self.n_experts}), heads={self.heads}, "
            f"top_k={self.top_k}, d_key={self.d_key}, query_norm={self.query_norm}, value_dim={self.value_dim}"
        )

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """Value rows are an expert table (sparse reads: own lr, no decay by default); sub-keys are
        not decayed."""
        return {"expert": [self.values], "no_decay": [self.sub_keys]}


register_ffw("pkm", PKMConfig, PKM.from_config)
