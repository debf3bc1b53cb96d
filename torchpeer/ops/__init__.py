"""torchpeer.ops: the two ops of a PEER layer, each with one spec, one checker and several backends.

    product_key_topk(queries (T, H, d_key), sub_keys (S, 2, n, d_key // 2), top_k, *, backend="auto")
        -> scores (T, H, top_k) fp32 (fp64 for fp64 inputs), indices (T, H, top_k) int64
    expert_mix(x (T, d), down (N, d), up (N, d), indices (T, H, K), gates (T, H, K), activation="gelu",
               *, lin=None, backend="auto") -> y (T, d) in x's dtype

backend: "auto" | "torch" | "triton" | "reference", resolved by dispatch.resolve_backend (which logs
the choice and refuses a backend that cannot run). The references (product_key_topk_reference,
expert_mix_reference) are the specs every backend is tested against.
"""

from __future__ import annotations

import torch

from .dispatch import BACKENDS, resolve_backend, triton_unavailable_reason
from .expert_mixing import ACTIVATIONS, check_mix_inputs, expert_mix_reference, expert_mix_torch
from .retrieval import (
    RetrievalKernelConfig,
    check_topk_inputs,
    product_key_topk_reference,
    product_key_topk_torch,
)


def _device(t) -> torch.device:
    # a non-tensor gets its TypeError from the op's checker, after dispatch
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


def product_key_topk(
    queries: torch.Tensor,
    sub_keys: torch.Tensor,
    top_k: int,
    *,
    backend: str = "auto",
    config: RetrievalKernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over all n*n product keys: expert a*n + b scores q[:d/2].C[a] + q[d/2:].C'[b].

    queries: (T, H, d_key); sub_keys: (S, 2, n, d_key // 2), S = 1 (shared) or H. Returns scores
    (T, H, top_k) float32 (float64 for float64 queries on torch/reference), differentiable w.r.t.
    queries and sub_keys, and indices (T, H, top_k) int64 in [0, n*n), by descending score.
    Scores are never rounded by an enclosing autocast. config: Triton algorithm and launch tuning.
    """
    backend = resolve_backend("product_key_topk", backend, _device(queries))
    if backend == "triton":
        from .retrieval.triton_op import product_key_topk_triton

        return product_key_topk_triton(queries, sub_keys, top_k, config)
    if backend == "reference":
        return product_key_topk_reference(queries, sub_keys, top_k)
    return product_key_topk_torch(queries, sub_keys, top_k)


def expert_mix(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    activation: str = "gelu",
    *,
    lin: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """y[t] = sum_{h,k} gates[t,h,k] * act(x[t] . down[i]) * up[i], i = indices[t,h,k]; with ``lin``
    (the GLU read-out's third table) y[t] = sum_{h,k} gates * act(x[t] . down[i]) * (x[t] . lin[i]) * up[i].

    x: (T, d); down, up, lin: (N, d) (may be wider than x, e.g. fp32 master tables with bf16 x);
    indices: (T, H, K) int32/int64; gates: (T, H, K). activation: "gelu", "relu" or "identity" (the
    linear read-out). Returns y: (T, d) in x's dtype, differentiable w.r.t. x, the tables and gates.
    """
    backend = resolve_backend("expert_mix", backend, _device(x))
    if backend == "triton":
        if lin is not None:
            from .expert_mixing.triton_glu_op import expert_mix_glu_triton

            return expert_mix_glu_triton(x, down, lin, up, indices, gates, activation)
        from .expert_mixing.triton_op import expert_mix_triton

        return expert_mix_triton(x, down, up, indices, gates, activation)
    if backend == "reference":
        return expert_mix_reference(x, down, up, indices, gates, activation, lin=lin)
    return expert_mix_torch(x, down, up, indices, gates, activation, lin=lin)


__all__ = [
    "BACKENDS",
    "ACTIVATIONS",
    "resolve_backend",
    "triton_unavailable_reason",
    "product_key_topk",
    "product_key_topk_reference",
    "product_key_topk_torch",
    "check_topk_inputs",
    "RetrievalKernelConfig",
    "expert_mix",
    "expert_mix_reference",
    "expert_mix_torch",
    "check_mix_inputs",
]
