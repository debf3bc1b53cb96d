"""The PEER layer: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts").

A drop-in replacement for a transformer FFW, f: R^d -> R^d. There are N single-neuron experts
e_i(x) = act(u_i . x) * v_i (u_i = ``down[i]``, v_i = ``up[i]``, no biases). Each of ``heads``
query networks maps x to a query q_h(x) (linear, then normalisation); the top_k experts of head h
are the exact top-k of q_h . key_i over all N product keys, and

    f(x) = sum_h sum_{i in topk_h} g_{h,i} e_i(x),   g_h = softmax (or sigmoid) of the top-k scores.

All heads share one expert pool and (by default, as in the paper) one set of product keys.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from torchpeer.layers.accounting import FFWCost, count_params, matmul_flops
from torchpeer.layers.registry import register_ffw
from torchpeer.mixing import ACTIVATIONS, peer_mix_reference, peer_mix_torch
from torchpeer.product_keys import product_key_topk
from torchpeer.usage import UsageTrackingMixin

GATES = ("softmax", "sigmoid")
QUERY_NORMS = ("batch", "layer", "none")
BACKENDS = ("auto", "torch", "reference", "triton")


@dataclass
class PEERConfig:
    """Options of ``PEER`` (the ``[model.peer]`` config section)."""

    n_experts: int = 1024**2
    heads: int = 8
    top_k: int = 16
    d_key: int = 128
    activation: str = "gelu"
    gate: str = "softmax"
    query_norm: str = "batch"
    shared_keys: bool = True
    backend: str = "auto"


def _triton_usable(device: torch.device) -> bool:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401

        from torchpeer.kernels import mixing as _m  # noqa: F401
        from torchpeer.kernels import retrieval as _r  # noqa: F401
    except ImportError:
        return False
    return True


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class PEER(UsageTrackingMixin, nn.Module):
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
        query_norm: "batch" (paper; BatchNorm1d over the heads*d_key query features), "layer"
            (LayerNorm per head) or "none". Note: at train time BatchNorm normalises with
            statistics of the whole batch, so in a causal LM a position's query depends on the other
            positions (including later ones) of the batch. The paper does this; "layer" avoids it.
        shared_keys: True (paper): one set of product keys for all heads; False: one per head.
        backend: "auto" (Triton on CUDA when available, else "torch"), "torch" (memory-lean
            chunked PyTorch), "reference" (naive, materialises gathered rows; tests) or "triton".

    Initialisation (why): ``down`` ~ N(0, 1/d), like a dense layer's first matrix, so u.x has unit
    variance for unit-variance x. With gates of expected sum of squares G per head (softmax over
    near-equal scores: G ~ 1/k; sigmoid near 0: G ~ k/4), ``up`` ~ N(0, 1/(h*G)) makes
    Var(f(x)) ~ E[act(u.x)^2], the same as a dense FFW with fan-in-scaled output weights. Sub-keys
    ~ N(0, 1/d_key), so a unit-variance query scores each key with unit variance. The query
    projection uses nn.Linear's default.

    Attributes: ``down``, ``up`` (n_experts, d_model) Parameters (u and v tables);
    ``sub_keys`` (key_sets, 2, sqrt(N), d_key//2); ``query_proj``, ``norm``.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int = 1024**2,
        heads: int = 8,
        top_k: int = 16,
        d_key: int = 128,
        activation: str = "gelu",
        gate: str = "softmax",
        query_norm: str = "batch",
        shared_keys: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        n = math.isqrt(n_experts) if isinstance(n_experts, int) and n_experts > 0 else -1
        if n < 1 or n * n != n_experts:
            raise ValueError(f"n_experts={n_experts} must be a perfect square (e.g. 1024**2 or 256**2)")
        if d_model < 1:
            raise ValueError(f"d_model must be >= 1, got {d_model}")
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        if not 1 <= top_k <= n:
            raise ValueError(f"top_k={top_k} must be in [1, sqrt(n_experts)={n}]; lower top_k or raise n_experts")
        if d_key < 2 or d_key % 2:
            raise ValueError(f"d_key={d_key} must be even and >= 2 (it is split into two halves)")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use one of {ACTIVATIONS}")
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; use one of {GATES}")
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"unknown query_norm {query_norm!r}; use one of {QUERY_NORMS}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
        self.d_model, self.n_experts, self.n_sub = d_model, n_experts, n
        self.heads, self.top_k, self.d_key = heads, top_k, d_key
        self.activation, self.gate, self.query_norm = activation, gate, query_norm
        self.shared_keys, self.backend = shared_keys, backend

        self.query_proj = nn.Linear(d_model, heads * d_key, bias=False)
        if query_norm == "batch":
            self.norm = nn.BatchNorm1d(heads * d_key)
        elif query_norm == "layer":
            self.norm = nn.LayerNorm(d_key)
        else:
            self.norm = nn.Identity()
        key_sets = 1 if shared_keys else heads
        self.sub_keys = nn.Parameter(torch.randn(key_sets, 2, n, d_key // 2) / math.sqrt(d_key))
        self.down = nn.Parameter(torch.randn(n_experts, d_model) / math.sqrt(d_model))
        gate_sq = 1.0 / top_k if gate == "softmax" else top_k / 4.0
        self.up = nn.Parameter(torch.randn(n_experts, d_model) / math.sqrt(heads * gate_sq))

    @classmethod
    def from_config(cls, d_model: int, cfg: PEERConfig) -> PEER:
        return cls(d_model, **dataclasses.asdict(cfg))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_experts={self.n_experts}, heads={self.heads}, top_k={self.top_k}, "
            f"d_key={self.d_key}, activation={self.activation}, gate={self.gate}, "
            f"query_norm={self.query_norm}, shared_keys={self.shared_keys}, backend={self.backend}"
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"PEER expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")

    def _resolve_backend(self, device: torch.device) -> str:
        if self.backend == "auto":
            return "triton" if device.type == "cuda" and _triton_usable(device) else "torch"
        if self.backend == "triton" and not _triton_usable(device):
            raise ValueError(
                "backend='triton' needs CUDA tensors and the triton package (or TRITON_INTERPRET=1 on the CPU); "
                "use backend='torch' or 'auto'"
            )
        return self.backend

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised queries. x: (..., d_model) -> (..., heads, d_key)."""
        self._check_input(x)
        lead = x.shape[:-1]
        q = self.query_proj(x.reshape(-1, self.d_model))  # (T, heads*d_key)
        if self.query_norm == "batch":
            q = self.norm(q)
        q = q.view(-1, self.heads, self.d_key)
        if self.query_norm == "layer":
            q = self.norm(q)
        return q.view(*lead, self.heads, self.d_key)

    def _topk(self, q: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        # Under autocast q arrives in the autocast dtype; the (small) key tables follow it so the
        # Triton kernel takes its half-precision tensor-core path. Gradients flow through the cast.
        keys = self.sub_keys if q.dtype == self.sub_keys.dtype else self.sub_keys.to(q.dtype)
        if backend == "triton":
            from torchpeer.kernels.retrieval import product_key_topk_triton

            return product_key_topk_triton(q, keys, self.top_k)
        return product_key_topk(q, keys, self.top_k)

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k experts per head.

        x: (..., d_model) -> scores (..., heads, top_k) float32 and indices (..., heads, top_k)
        int64 in [0, n_experts), sorted by descending score.
        """
        q = self.query(x)
        lead = q.shape[:-2]
        scores, indices = self._topk(q.reshape(-1, self.heads, self.d_key), self._resolve_backend(x.device))
        return scores.view(*lead, self.heads, self.top_k), indices.view(*lead, self.heads, self.top_k)

    def gates(self, scores: torch.Tensor) -> torch.Tensor:
        """Gate weights from retrieved scores (..., heads, top_k), same shape."""
        return scores.softmax(dim=-1) if self.gate == "softmax" else torch.sigmoid(scores)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        backend = self._resolve_backend(x.device)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_model)
        compute = _autocast_dtype(x.device)
        q = self.query(flat)
        if compute is not None:
            # BatchNorm/LayerNorm return fp32 under autocast; retrieval in the autocast dtype uses the
            # tensor-core path of the Triton kernel (scores are still accumulated and returned in fp32).
            q = q.to(compute)
            flat = flat.to(compute)
        scores, indices = self._topk(q, backend)
        g = self.gates(scores)
        self._track_usage(indices, g)
        if backend == "triton":
            from torchpeer.kernels.mixing import peer_mix_triton

            y = peer_mix_triton(flat, self.down, self.up, indices, g, self.activation)
        elif backend == "reference":
            y = peer_mix_reference(flat, self.down, self.up, indices, g, self.activation)
        else:
            y = peer_mix_torch(flat, self.down, self.up, indices, g, self.activation)
        return y.view(*lead, self.d_model)

    def cost(self) -> FFWCost:
        """Per-token cost. FLOPs: query projection 2*d*h*d_key; sub-key scores 2*h*sqrt(N)*d_key
        (both halves); experts h*k*(2d in + 2d out). Active params: query network and norm, all
        sub-keys (every one is scored), and h*k u and v rows."""
        d, h, k, dk = self.d_model, self.heads, self.top_k, self.d_key
        flops = matmul_flops(1, d, h * dk) + h * matmul_flops(1, dk, self.n_sub) + h * k * 4 * d
        query_params = count_params(self.query_proj) + count_params(self.norm)
        active = query_params + self.sub_keys.numel() + h * k * 2 * d
        return FFWCost(total_params=count_params(self), active_params=active, forward_flops=flops)

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """The expert tables (down, up) are read a few rows per token: own lr, no decay by default;
        sub-keys are not decayed."""
        return {"expert": [self.down, self.up], "no_decay": [self.sub_keys]}


register_ffw("peer", PEERConfig, PEER.from_config)
