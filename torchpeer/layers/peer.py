"""The PEER layer: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts").

A drop-in replacement for a transformer FFW, f: R^d -> R^d. There are N single-neuron experts
e_i(x) = act(u_i . x) * v_i (u_i = ``down[i]``, v_i = ``up[i]``, no biases). Each of ``heads``
query networks maps x to a query q_h(x) (linear, then normalisation); the top_k experts of head h
are the exact top-k of q_h . key_i over all N product keys, and

    f(x) = sum_h sum_{i in topk_h} g_{h,i} e_i(x),   g_h = softmax (or sigmoid) of the top-k scores.

All heads share one expert pool and (by default, as in the paper) one set of product keys.
Retrieval is the shared ``ProductKeyRouter`` (router.py); mixing is ``torchpeer.ops.expert_mix``.
Registered as FFW kind "peer" (config ``PEERConfig``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from torchpeer.layers.accounting import FFWCost, count_params
from torchpeer.layers.registry import register_ffw
from torchpeer.layers.router import ProductKeyRouter, RoutedLayer, autocast_dtype
from torchpeer.layers.validators import check_choice, check_input
from torchpeer.ops import ACTIVATIONS, BACKENDS, expert_mix, resolve_backend
from torchpeer.usage import UsageTrackingMixin

GATES = ("softmax", "sigmoid")


@dataclass
class PEERConfig:
    """Options of ``PEER`` (the ``[model.peer]`` config section)."""

    n_experts: int = 1024**2
    heads: int = 8
    top_k: int = 16
    d_key: int = 128
    activation: str = "gelu"
    gate: str = "softmax"
    query_norm: str = "ema"
    shared_keys: bool = True
    backend: str = "auto"
    up_init_std: float | None = None


class PEER(RoutedLayer, UsageTrackingMixin, nn.Module):
    """PEER layer. Input (..., d_model) -> output (..., d_model).

    Args:
        d_model: model width d.
        n_experts: N, a perfect square (the product keys have sqrt(N) sub-keys per half).
            Paper default 1024**2.
        heads: number of query heads h (paper: 8). Head outputs are summed.
        top_k: experts retrieved per head k (paper: 16), at most sqrt(N).
        d_key: query/key width, even. Default 128: the retrieval cost per token and head is
            2*d*d_key (query) + 2*sqrt(N)*d_key (sub-key scores), so d_key = 128 keeps retrieval
            at the same order as the experts' own 4*d*k FLOPs for d ~ 1024, N = 1024**2, while
            64-wide half keys still separate 1024 sub-keys well.
        activation: "gelu" or "relu" for the expert neurons.
        gate: "softmax" (paper) or "sigmoid" over each head's k retrieved scores.
        query_norm: a ``build_query_norm`` kind. Default "ema": batch normalisation whose value
            uses running statistics of earlier steps only (causal-safe) and whose gradient is
            BatchNorm's. "batch" is the paper's BatchNorm1d over the heads*d_key query features:
            at train time it normalises with statistics of the whole batch, so in a causal LM a
            position's query depends on the other positions (including later ones) of the batch.
            "layer" (LayerNorm per head) and "none" are the other plain choices.
        shared_keys: True (paper): one set of product keys for all heads; False: one per head.
        backend: "auto" (Triton on CUDA when available, else "torch"), "torch" (memory-lean
            chunked PyTorch), "reference" (naive, materialises gathered rows; tests) or "triton";
            used for both ops (retrieval and mixing), resolved by ``torchpeer.ops``.
        up_init_std: std of the ``up`` (v) table at init; None = 1/sqrt(d_model) (see below).

    Initialisation (why): ``down`` ~ N(0, 1/d), like a dense layer's first matrix, so u.x has unit
    variance for unit-variance x. ``up`` ~ N(0, 1/d) (default ``up_init_std``): the layer's output
    starts small and Adam's steps (~lr per entry) are a few % of an entry, as for a dense layer's
    weights, so the experts' outputs learn. The earlier choice N(0, 1/(h*G)) (G = expected sum of
    squared gates per head: softmax over near-equal scores G ~ 1/k, sigmoid near 0 G ~ k/4) gave
    Var(f(x)) ~ E[act(u.x)^2] like a dense FFW, but entries of ~1.4 at h=8, k=16, which 1e-3 steps
    move by 0.07 % per step: on the H200 (N = 1024**2, 30M tokens) it left usage at 15 % and
    32.3 valid ppl against 73 % and 29.7 with 1/sqrt(d) (docs/research/routing.md). Pass
    ``up_init_std=(h*G)**-0.5`` for the old init. Sub-keys ~ N(0, 1/d_key), so a unit-variance
    query scores each key with unit variance. The query projection uses nn.Linear's default.

    Attributes: ``down``, ``up`` (n_experts, d_model) Parameters (u and v tables); ``router``
    (ProductKeyRouter: ``query_proj``, ``norm``, ``sub_keys`` (key_sets, 2, sqrt(N), d_key//2),
    also reachable as attributes of the layer).
    """

    # Replaces expert_mix when set (same arguments, no backend): an optimizer that updates the
    # tables inside the mixing backward installs it. A plain attribute, not part of the state_dict.
    table_update = None

    def __init__(
        self,
        d_model: int,
        n_experts: int = 1024**2,
        heads: int = 8,
        top_k: int = 16,
        d_key: int = 128,
        activation: str = "gelu",
        gate: str = "softmax",
        query_norm: str = "ema",
        shared_keys: bool = True,
        backend: str = "auto",
        up_init_std: float | None = None,
    ):
        super().__init__()
        if isinstance(n_experts, bool) or not isinstance(n_experts, int):
            raise TypeError(f"n_experts must be an int (a perfect square, e.g. 1024**2), got {n_experts!r}")
        n = math.isqrt(n_experts) if n_experts > 0 else -1
        if n < 1 or n * n != n_experts:
            raise ValueError(f"n_experts={n_experts} must be a perfect square (e.g. 1024**2 or 256**2)")
        check_choice("activation", activation, ACTIVATIONS)
        check_choice("gate", gate, GATES)
        check_choice("backend", backend, BACKENDS)
        if up_init_std is not None and not (
            isinstance(up_init_std, (int, float)) and not isinstance(up_init_std, bool) and 0 < up_init_std < math.inf
        ):
            raise ValueError(f"up_init_std must be a positive number (or None = 1/sqrt(d_model)), got {up_init_std!r}")
        self.router = ProductKeyRouter(
            d_model, n, heads, top_k, d_key, query_norm, key_sets=1 if shared_keys else heads, backend=backend
        )
        self.d_model, self.n_experts, self.n_sub = d_model, n_experts, n
        self.heads, self.top_k, self.d_key = heads, top_k, d_key
        self.activation, self.gate, self.query_norm = activation, gate, query_norm
        self.shared_keys, self.backend = shared_keys, backend

        self.down = nn.Parameter(torch.randn(n_experts, d_model) / math.sqrt(d_model))
        self.up_init_std = 1.0 / math.sqrt(d_model) if up_init_std is None else float(up_init_std)
        self.up = nn.Parameter(torch.randn(n_experts, d_model) * self.up_init_std)

    @classmethod
    def from_config(cls, d_model: int, cfg: PEERConfig) -> PEER:
        return cls(d_model, **dataclasses.asdict(cfg))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_experts={self.n_experts}, heads={self.heads}, top_k={self.top_k}, "
            f"d_key={self.d_key}, activation={self.activation}, gate={self.gate}, "
            f"query_norm={self.query_norm}, shared_keys={self.shared_keys}, backend={self.backend}, "
            f"up_init_std={self.up_init_std:.4g}"
        )

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k experts per head: the ones ``forward`` mixes (same precision rules).

        x: (..., d_model) -> scores (..., heads, top_k) float32 and indices (..., heads, top_k)
        int64 in [0, n_experts), sorted by descending score.
        """
        check_input(x, self.d_model, "PEER")
        lead = x.shape[:-1]
        _, scores, indices = self.router(x.reshape(-1, self.d_model))
        return scores.view(*lead, self.heads, self.top_k), indices.view(*lead, self.heads, self.top_k)

    def gates(self, scores: torch.Tensor) -> torch.Tensor:
        """Gate weights from retrieved scores (..., heads, top_k), same shape."""
        return scores.softmax(dim=-1) if self.gate == "softmax" else torch.sigmoid(scores)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, "PEER")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_model)
        q, scores, indices = self.router(flat)
        g = self.gates(scores)
        self._track_routing(q, indices, g)
        compute = autocast_dtype(x.device)
        if compute is not None:
            flat = flat.to(compute)  # mix in the autocast dtype (the tables stay fp32 masters)
        if self.table_update is not None:  # a fused table optimizer's mixing (e.g. torchpeer.optim)
            y = self.table_update(flat, self.down, self.up, indices, g, self.activation)
        else:
            y = expert_mix(flat, self.down, self.up, indices, g, self.activation, backend=self.backend)
        return y.view(*lead, self.d_model)

    def op_backends(self, device: torch.device | str | None = None) -> dict[str, str]:
        """{op: backend} this layer runs with on ``device`` (default: where its tables live)."""
        device = device or self.down.device
        return {
            "product_key_topk": self.router.retrieval_backend(device),
            "expert_mix": resolve_backend("expert_mix", self.backend, device),
        }

    def cost(self) -> FFWCost:
        """Per-token cost: the router's (query projection 2*d*h*d_key, sub-key scores
        2*h*sqrt(N)*d_key, query network and all sub-keys active) plus the experts, h*k*(2d in +
        2d out) FLOPs and h*k u and v rows."""
        d, h, k = self.d_model, self.heads, self.top_k
        routing = self.router.cost()
        return FFWCost(
            total_params=count_params(self),
            active_params=routing.active_params + h * k * 2 * d,
            forward_flops=routing.forward_flops + h * k * 4 * d,
        )

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """The expert tables (down, up) are read a few rows per token: own lr, no decay by default;
        the router's sub-keys and norm are not decayed."""
        return {"expert": [self.down, self.up], "no_decay": self.router.optim_groups()["no_decay"]}


register_ffw("peer", PEERConfig, PEER.from_config)
