"""The fused ``ema`` query norm as torch.library custom ops, and its entry point ema_norm_triton.

Two ops, because an op with an autograd formula must not mutate its inputs:
  torchpeer::ema_norm_fwd (functional, differentiable): y and aux (see triton_kernels.py);
  torchpeer::ema_stats_update (mutates running_mean, running_var, num_updates): the EMA update,
  run under no_grad after the forward. Both are opaque to torch.compile (no graph breaks; shapes
  from register_fake: aux's row count depends on F and the device only, never on T).
Launches: training forward 2 kernels + the num_updates increment; eval forward 1 kernel; backward
2 kernels (BatchNorm-style gradient) or 1 kernel + one small sum (plain gradient).
"""

from __future__ import annotations

import torch
import triton

from torchpeer.ops.dispatch import triton_interpreting

from .checks import check_ema_norm_inputs
from .triton_kernels import _bwd_dx_kernel, _bwd_reduce_kernel, _fwd_kernel, _update_kernel

# BLOCK_T x BLOCK_F fp32 tile per iteration (16 KiB in registers at 4 warps: 32 values a thread);
# 64 bf16 features = one 128-byte line per row. Programs per SM of the (feature block, split) grid.
BLOCK_T, BLOCK_F, NUM_WARPS, PROGRAMS_PER_SM, MAX_SPLITS = 64, 64, 4, 4, 64
MODES = {"plain": 0, "stats": 1, "bn": 2}  # value only / + batch statistics / + BatchNorm gradient


def _blocks() -> tuple[int, int]:
    return (16, 16) if triton_interpreting() else (BLOCK_T, BLOCK_F)


def num_splits(F: int, device: torch.device) -> int:
    """Token splits P of the statistics grid: a function of F and the device only (shapes of the
    fake tensors must not depend on T). About PROGRAMS_PER_SM programs per SM in all."""
    if triton_interpreting():
        return 3  # several splits, some empty at small T: exercises the combination
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_SPLITS, PROGRAMS_PER_SM * sms // triton.cdiv(F, _blocks()[1])))


def _grid(T: int, F: int, P: int):
    """-> (grid, rows per split): P splits of whole BLOCK_T tiles (trailing ones may be empty)."""
    bt, bf = _blocks()
    rps = triton.cdiv(triton.cdiv(T, P), bt) * bt
    return (triton.cdiv(F, bf), P), rps


def _forward(x, weight, bias, running_mean, running_var, eps, mode):
    T, F = x.shape
    bt, bf = _blocks()
    stats = mode != MODES["plain"]
    P = num_splits(F, x.device) if stats else max(1, min(num_splits(F, x.device), triton.cdiv(T, bt)))
    y = torch.empty_like(x)
    aux = torch.empty((2 + 2 * P, F) if stats else (2, F), device=x.device, dtype=torch.float32)
    grid, rps = _grid(T, F, P)
    _fwd_kernel[grid](
        x, weight, bias, running_mean, running_var, y, aux, T, F, rps, x.stride(0), y.stride(0), eps,
        STATS=stats, BLOCK_T=bt, BLOCK_F=bf, num_warps=NUM_WARPS,
    )  # fmt: skip
    return y, aux


def _backward(dy, x, weight, aux, eps, mode, need_x):
    T, F = x.shape
    bt, bf = _blocks()
    bn = mode == MODES["bn"]
    P_fwd = (aux.shape[0] - 2) // 2  # 0 in plain mode
    P = P_fwd if bn else max(1, min(num_splits(F, x.device), triton.cdiv(T, bt)))
    grid, rps = _grid(T, F, P)
    red = torch.empty((2 * P, F), device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    p_pad = max(2, triton.next_power_of_2(P))
    _bwd_reduce_kernel[grid](
        x, dy, weight, aux, red, dx, T, F, rps, P, x.stride(0), dy.stride(0), dx.stride(0) if need_x else 0, eps,
        BN=bn, WRITE_DX=need_x and not bn, P_PAD=p_pad, BLOCK_T=bt, BLOCK_F=bf, num_warps=NUM_WARPS,
    )  # fmt: skip
    if bn and need_x:
        dw, db = torch.empty_like(weight), torch.empty_like(weight)
        _bwd_dx_kernel[grid](
            x, dy, weight, aux, red, dx, dw, db, T, F, rps, P, x.stride(0), dy.stride(0), dx.stride(0), eps,
            P_PAD=p_pad, BLOCK_T=bt, BLOCK_F=bf, num_warps=NUM_WARPS,
        )  # fmt: skip
        return dx, dw, db
    # dweight, dbias only (or the plain gradient, whose dx the reduce kernel wrote): centred at the
    # running mean (plain) or the batch mean (BN, no dx needed): dweight = rstd * sum dy * (x - mu).
    sums = red.view(P, 2, F).sum(0)
    rstd = torch.rsqrt(aux[1] + eps)
    b = sums[1]
    if bn:
        cnt = (T - torch.arange(P_fwd, device=x.device) * rps).clamp(0, rps).float()
        b_mu = (cnt[:, None] * aux[2::2]).sum(0) / T
        b = b + (b_mu - aux[0]) * sums[0]
    return dx, (rstd * b).to(weight.dtype), sums[0].to(weight.dtype)


@torch.library.custom_op("torchpeer::ema_norm_fwd", mutates_args=())
def _fwd_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    mode: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias, running_mean, running_var, eps, mode)


@_fwd_op.register_fake
def _(x, weight, bias, running_mean, running_var, eps, mode):
    F = x.shape[1]
    rows = 2 if mode == MODES["plain"] else 2 + 2 * num_splits(F, x.device)
    return torch.empty_like(x), x.new_empty((rows, F), dtype=torch.float32)


@torch.library.custom_op("torchpeer::ema_norm_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, aux: torch.Tensor, eps: float, mode: int, need_x: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy.contiguous(), x, weight, aux, eps, mode, need_x)


@_bwd_op.register_fake
def _(dy, x, weight, aux, eps, mode, need_x):
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    return dx, torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, _, _, _, eps, mode = inputs
    _, aux = output
    ctx.save_for_backward(x, weight, aux)
    ctx.eps, ctx.mode = eps, mode
    ctx.mark_non_differentiable(aux)


def _backward_op(ctx, dy, _daux):
    x, weight, aux = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_w or need_b):
        return None, None, None, None, None, None, None
    dx, dw, db = _bwd_op(dy, x, weight, aux, ctx.eps, ctx.mode, need_x)
    return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), None, None, None, None


_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


@torch.library.custom_op(
    "torchpeer::ema_stats_update", mutates_args=("running_mean", "running_var", "num_updates")
)  # fmt: skip
def _update_op(
    running_mean: torch.Tensor, running_var: torch.Tensor, num_updates: torch.Tensor, aux: torch.Tensor,
    tokens: int, momentum: float,
) -> None:  # fmt: skip
    F = running_mean.shape[0]
    P = (aux.shape[0] - 2) // 2
    grid, rps = _grid(tokens, F, P)
    _update_kernel[grid[:1]](
        aux, running_mean, running_var, num_updates, tokens, F, rps, P, momentum,
        P_PAD=max(2, triton.next_power_of_2(P)), BLOCK_F=_blocks()[1], num_warps=NUM_WARPS,
    )  # fmt: skip
    num_updates.add_(1)  # after the kernel (same stream), which read the old count


@_update_op.register_fake
def _(running_mean, running_var, num_updates, aux, tokens, momentum):
    return None


def ema_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_updates: torch.Tensor,
    eps: float,
    momentum: float,
    training: bool,
    bn_grad: bool = True,
) -> torch.Tensor:
    """The reference's contract (reference.ema_norm_reference) with the Triton kernels: x (T, F)
    fp16/bf16/fp32 -> y (T, F) in x's dtype; fp32 statistics; in training with T > 1 the running
    statistics are updated in place. Differentiable w.r.t. x, weight and bias."""
    check_ema_norm_inputs(x, weight, bias, running_mean, running_var, num_updates, eps, momentum)
    T = x.shape[0]
    update = training and T > 1
    mode = (MODES["bn"] if bn_grad else MODES["stats"]) if update else MODES["plain"]
    y, aux = _fwd_op(x.contiguous(), weight, bias, running_mean, running_var, float(eps), mode)
    if update:
        with torch.no_grad():
            _update_op(running_mean, running_var, num_updates, aux, T, float(momentum))
    return y
