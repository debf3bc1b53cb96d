"""The Triton retrieval: torch.library custom ops, an autograd Function over them
(`ProductKeyTopkFunction`), and its entry point product_key_topk_triton.

Custom ops make the kernels opaque to torch.compile (no tracing into the launches, no graph
breaks; output shapes come from register_fake). A RetrievalKernelConfig cannot be an op argument,
so it travels as its index in the config registry (kernel_config.config_id).
In plain eager mode the Function calls the implementation directly, skipping the ops' dispatch
(host time, issue 19); under torch.compile, on fake tensors or subclasses, or under a
TorchDispatchMode it calls the ops (ops.dispatch.call_implementation_directly). The Function's
backward is the ops' registered autograd formula (_backward_op), which makes the same choice.
"""

from __future__ import annotations

import logging

import torch

from ..dispatch import call_implementation_directly
from .checks import check_topk_inputs
from .kernel_config import DEFAULT_CONFIG, RetrievalKernelConfig, config_by_id, config_id
from .torch_impl import product_key_topk_torch
from .triton_backward import backward
from .triton_common import dot_fp32, next_pow2
from .triton_merge import launch_merge
from .triton_onepass import launch_onepass
from .triton_packed import launch_packed
from .triton_queue import launch_queue, queue_takes
from .triton_split import launch_split
from .triton_threshold import launch_threshold

logger = logging.getLogger("torchpeer.ops")
_said_too_wide: set[int] = set()


def forward_impl(queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config: RetrievalKernelConfig) -> str:
    """The forward algorithm config.forward resolves to for these inputs ("threshold", "merge", "split",
    "onepass", "packed" or "queue"). "auto": "split" for at most config.small_tokens tokens; "queue" for
    bf16/fp16 queries and keys with top_k <= 16 and at least config.queue_tokens tokens (0: never), where
    the queue kernel takes n (its keys hold a tile index of at most 8 bits); "merge" for other dtypes with
    top_k <= 16; else "threshold". Never "onepass" or "packed" (kernel_config.py: what was measured)."""
    if config.forward != "auto":
        return config.forward
    if queries.shape[0] <= config.small_tokens:
        return "split"  # a decode step: no plan sized for 64k tokens (triton_split.py)
    half = (torch.bfloat16, torch.float16)
    both_half = queries.dtype == sub_keys.dtype and queries.dtype in half
    # queue: timed faster than threshold only with half inputs, top_k 16, T 16384 and 65536 (H100)
    if both_half and top_k <= 16 and 0 < config.queue_tokens <= queries.shape[0]:
        if queue_takes(sub_keys.shape[2], top_k, dot_fp32(queries, sub_keys), config):
            return "queue"  # (launch_queue raises where it does not)
    return "merge" if not both_half and top_k <= 16 else "threshold"


def forward(queries, sub_keys, top_k: int, config: RetrievalKernelConfig = DEFAULT_CONFIG):
    """-> scores (T, H, top_k) fp32, indices (T, H, top_k) int64 (no autograd)."""
    impl = forward_impl(queries, sub_keys, top_k, config)
    if impl == "split":
        return launch_split(queries, sub_keys, top_k, config)
    if impl == "threshold":
        return launch_threshold(queries, sub_keys, top_k, config)
    if impl == "onepass":
        return launch_onepass(queries, sub_keys, top_k, config)
    if impl == "packed":
        return launch_packed(queries, sub_keys, top_k, config)
    if impl == "queue":
        return launch_queue(queries, sub_keys, top_k, config)
    return launch_merge(queries, sub_keys, top_k, config)


@torch.library.custom_op("torchpeer::product_key_topk_fwd", mutates_args=())
def _topk_fwd_op(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(queries, sub_keys, top_k, config_by_id(config))


@_topk_fwd_op.register_fake
def _(queries, sub_keys, top_k, config):
    shape = (queries.shape[0], queries.shape[1], top_k)
    return queries.new_empty(shape, dtype=torch.float32), queries.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("torchpeer::product_key_topk_bwd", mutates_args=())
def _topk_bwd_op(
    d_scores: torch.Tensor,
    queries: torch.Tensor,
    sub_keys: torch.Tensor,
    indices: torch.Tensor,
    need_q: bool,
    need_k: bool,
    config: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    dq, dk = backward(d_scores.contiguous(), queries, sub_keys, indices, need_q, need_k, config_by_id(config))
    # an op cannot return None: an empty tensor stands for "not needed"
    return (dq if dq is not None else queries.new_empty(0)), (dk if dk is not None else sub_keys.new_empty(0))


@_topk_bwd_op.register_fake
def _(d_scores, queries, sub_keys, indices, need_q, need_k, config):
    return queries.new_empty(queries.shape if need_q else (0,)), sub_keys.new_empty(sub_keys.shape if need_k else (0,))


def _setup_context(ctx, inputs, output):
    queries, sub_keys, _, config = inputs
    _, indices = output
    ctx.save_for_backward(queries, sub_keys, indices)
    ctx.config = config
    ctx.mark_non_differentiable(indices)
    # the indices' gradient is never used: without this autograd would memset a zero (T, H, K)
    # int64-shaped gradient for it at every backward (a launch and bytes for nothing)
    ctx.set_materialize_grads(False)


def _backward_op(ctx, d_scores, _d_indices):
    queries, sub_keys, indices = ctx.saved_tensors
    need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if d_scores is None or not (need_q or need_k):  # None: the scores did not reach the loss
        return None, None, None, None
    if call_implementation_directly(d_scores):
        dq, dk = backward(d_scores.contiguous(), queries, sub_keys, indices, need_q, need_k, config_by_id(ctx.config))
    else:
        dq, dk = _topk_bwd_op(d_scores, queries, sub_keys, indices, need_q, need_k, ctx.config)
    return (dq if need_q else None), (dk if need_k else None), None, None


_topk_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


class ProductKeyTopkFunction(torch.autograd.Function):
    """scores, indices = product_key_topk(queries, sub_keys, top_k) with one custom op per forward
    and one per backward (or their implementations, in eager mode); the same formula as the ops'
    registered autograd (_setup_context, _backward_op). config: a config_id."""

    @staticmethod
    def forward(ctx, queries, sub_keys, top_k, config):
        if call_implementation_directly(queries):
            scores, indices = forward(queries, sub_keys, top_k, config_by_id(config))
        else:
            scores, indices = _topk_fwd_op(queries, sub_keys, top_k, config)
        _setup_context(ctx, (queries, sub_keys, top_k, config), (scores, indices))
        return scores, indices

    backward = staticmethod(_backward_op)  # the op's own formula; it picks the op or the implementation


def product_key_topk_triton(
    queries: torch.Tensor, sub_keys: torch.Tensor, top_k: int, config: RetrievalKernelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k product-key retrieval (Triton; CUDA, or the CPU under TRITON_INTERPRET=1).

    queries: (T, H, d_key), any float dtype (scores are computed in fp32).
    sub_keys: (S, 2, n, d_key // 2), S == 1 (shared by all heads) or S == H.
    Returns scores (T, H, top_k) float32, differentiable w.r.t. queries and sub_keys, and
    indices (T, H, top_k) int64 in [0, n*n), expert i = a * n + b, sorted by descending score.
    Where the backend is chosen: torchpeer.ops.dispatch (call torchpeer.ops.product_key_topk).
    """
    check_topk_inputs(queries, sub_keys, top_k, kernel=True)
    config = config or DEFAULT_CONFIG
    if max(2, next_pow2(top_k)) > config.max_kernel_kp:
        # the register-resident candidate set would be too large; the chunked PyTorch version has
        # the same contract (said once, so the switch is never silent)
        if top_k not in _said_too_wide:
            _said_too_wide.add(top_k)
            logger.info("product_key_topk: top_k=%d is above the kernels' limit: chunked torch answers", top_k)
        return product_key_topk_torch(queries, sub_keys, top_k)
    return ProductKeyTopkFunction.apply(queries, sub_keys, top_k, config_id(config))
