"""Product-Key Memory baseline (Lample et al. 2019, "Large Memory Layers with Product Keys").

A memory of N = n_keys**2 value vectors, addressed by product keys. Per token and head h:

    q_h = norm(W_q x)_h                       (heads, d_key) query, BatchNorm by default (Lample)
    scores, idx = top_k over all N keys of q_h . key_i, key_i = [C_h[a] ; C'_h[b]], i = a*n_keys + b
    w = softmax(scores) over the k retrieved memories
    y = sum_h sum_k w[h, k] * values[idx[h, k]]

Unlike PEER (whose heads share one key set and whose experts are single neurons with an
activation), every PKM head has its own sub-key tables, the heads share one value table, and a
"memory" is a plain value vector (no input-dependent activation). Query network, query norm,
sub-keys and the exact top-k over N keys are the shared ``ProductKeyRouter`` (router.py, one key set
per head), so PKM retrieves with the same backends as PEER (Triton on CUDA); the weighted value sum is
``F.embedding_bag(mode="sum", per_sample_weights=w)``, so the (tokens, heads, k, value_dim)
gathered rows are never materialised.

Default d_key = 256 (two sub-keys of 128 per head). Lample et al. use d_key = 512 (sub-keys of
256) for a 1024-wide model; we halve it because the retrieval cost 2 * heads * n_keys * d_key per
token (8 heads, 1024 sub-keys: 4.2 MFLOPs at 256) is already the largest term at the model widths
studied here, while 128-dimensional sub-keys still separate 1024 sub-keys comfortably.

Initialisation: sub-keys ~ N(0, 1 / d_key), so with normalised (unit-variance) queries each full
score has about unit variance and the softmax over the top-k starts neither flat nor one-hot;
values ~ N(0, 1 / value_dim) as in Lample et al.

Registered as FFW kind "pkm" (config ``PKMConfig``).
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
from torchpeer.layers.router import ProductKeyRouter, RoutedLayer, norm_statistics_kept
from torchpeer.layers.validators import check_input, check_positive
from torchpeer.usage import UsageTrackingMixin


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
    backend: str = "auto"


class PKM(RoutedLayer, UsageTrackingMixin, nn.Module):
    """Product-key memory layer.

    Args:
        d_model: input and output width.
        n_keys: sub-keys per half and head; the memory holds N = n_keys**2 values.
        heads: number of query heads H (each with its own sub-keys; values are shared).
        top_k: memories retrieved per head (<= n_keys).
        d_key: query / full key width (even; each sub-key is d_key // 2 wide).
        query_norm: "batch" (BatchNorm1d over the H * d_key query features, Lample et al.),
            "layer" (LayerNorm over each head's d_key query), "none", or another
            ``build_query_norm`` kind.
        value_dim: width of a value vector (default d_model); when different, a bias-free
            Linear(value_dim, d_model) maps the memory read back to d_model.
        backend: retrieval backend ("auto" | "torch" | "triton" | "reference", see torchpeer.ops).

    Attributes: ``router`` (ProductKeyRouter: ``query_proj`` Linear(d_model, H * d_key) with bias,
    ``norm``, ``sub_keys`` (H, 2, n_keys, d_key // 2); also attributes of the layer),
    ``values`` (N, value_dim), ``out_proj`` (None unless value_dim != d_model).
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
        backend: str = "auto",
    ):
        super().__init__()
        value_dim = d_model if value_dim is None else value_dim
        check_positive(d_model=d_model, n_keys=n_keys, value_dim=value_dim)
        self.router = ProductKeyRouter(
            d_model, n_keys, heads, top_k, d_key, query_norm, key_sets=heads, query_bias=True, backend=backend
        )
        self.d_model, self.n_keys, self.heads, self.top_k = d_model, n_keys, heads, top_k
        self.d_key, self.query_norm, self.value_dim, self.backend = d_key, query_norm, value_dim, backend
        self.n_experts = n_keys * n_keys  # for UsageTrackingMixin: one "expert" per memory slot

        self.values = nn.Parameter(torch.randn(n_keys * n_keys, value_dim) / math.sqrt(value_dim))
        self.out_proj = nn.Linear(value_dim, d_model, bias=False) if value_dim != d_model else None

    @classmethod
    def from_config(cls, d_model: int, cfg: PKMConfig) -> PKM:
        return cls(d_model, **{k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., d_model) -> (scores, indices), each (..., heads, top_k), best first: the memories
        ``forward`` reads. scores are float32 (float64 for float64 inputs) and differentiable;
        indices int64 in [0, N)."""
        check_input(x, self.d_model, "PKM", self.router.query_proj.weight.dtype)
        lead = x.shape[:-1]
        with norm_statistics_kept(self.router.norm):  # inspecting is no training step
            _, scores, indices = self.router(x.reshape(-1, self.d_model))
        return scores.view(*lead, self.heads, self.top_k), indices.view(*lead, self.heads, self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_model) -> (..., d_model)."""
        check_input(x, self.d_model, "PKM", self.router.query_proj.weight.dtype)
        lead = x.shape[:-1]
        q, scores, indices = self.router(x.reshape(-1, self.d_model))  # (T, H, k) each
        T, hk = scores.shape[0], self.heads * self.top_k
        weights = F.softmax(scores, dim=-1)  # (T, H, k) fp32 (fp64 for fp64 input), per head over its k
        self._track_routing(q, indices, weights)
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

    def op_backends(self, device: torch.device | str | None = None) -> dict[str, str]:
        """{op: backend} this layer runs with (the value read is F.embedding_bag, not an op)."""
        return {"product_key_topk": self.router.retrieval_backend(device)}

    def cost(self) -> FFWCost:
        """Per token: the router's (query projection 2*d*H*d_key, all sub-key scores 2*H*n_keys*d_key;
        query network and every sub-key active), plus H*k value rows: 2*H*k*value_dim FLOPs for the
        weighted sum [+ 2*value_dim*d_model and its parameters for the output projection]."""
        H, k, v = self.heads, self.top_k, self.value_dim
        routing = self.router.cost()
        out_params = count_params(self.out_proj) if self.out_proj is not None else 0
        flops = routing.forward_flops + H * matmul_flops(1, k, v)
        if self.out_proj is not None:
            flops += matmul_flops(1, v, self.d_model)
        return FFWCost(
            total_params=count_params(self),
            active_params=routing.active_params + H * k * v + out_params,
            forward_flops=flops,
        )

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """Value rows are an expert table (sparse reads: own lr, no decay by default); the router's
        sub-keys and norm are not decayed."""
        return {"expert": [self.values], "no_decay": self.router.optim_groups()["no_decay"]}

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_keys={self.n_keys} (N={self.n_experts}), heads={self.heads}, "
            f"top_k={self.top_k}, d_key={self.d_key}, query_norm={self.query_norm}, value_dim={self.value_dim}, "
            f"backend={self.backend}"
        )


register_ffw("pkm", PKMConfig, PKM.from_config)
