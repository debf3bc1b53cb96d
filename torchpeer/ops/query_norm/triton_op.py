"""The fused ``ema`` query norm: one autograd Function (`EMANormFunction`) over two torch.library
custom ops, and its entry point ema_norm_triton.

Per training step the host issues one custom op in the forward and one in the backward:
  torchpeer::ema_norm_fwd_update (mutates running_mean, running_var, num_updates): y and aux (see
  triton_kernels.py) in ONE kernel that also updates the running statistics (FUSED_UPDATE);
  torchpeer::ema_norm_fwd (functional): y and aux of the value alone (eval mode, T = 1);
  torchpeer::ema_norm_bwd (functional): dx, dweight, dbias.
A custom op with an autograd formula must be functional, so the autograd formula lives in the
Function, which torch.compile traces (fullgraph) with the ops opaque inside it (shapes from
register_fake: aux's row count depends on F and the device only, never on T).
Launches: training forward 1 kernel (FUSED_UPDATE; else 2 + the num_updates increment); eval
forward 1 kernel; backward 2 kernels (BatchNorm-style gradient) or 1 kernel + one small sum
(plain gradient). No host syncs.
"""

from __future__ import annotations

import functools

import torch

from ..dispatch import call_implementation_directly
from .checks import check_ema_norm_inputs
from .triton_kernels import _bwd_dx_kernel, _bwd_reduce_kernel, _fwd_kernel, _fwd_update_kernel, _update_kernel

# BLOCK_T x BLOCK_F fp32 tile per iteration (16 KiB in registers at 4 warps: 32 values a thread);
# 64 bf16 features = one 128-byte line per row. Programs per SM of the (feature block, split) grid.
BLOCK_T, BLOCK_F, NUM_WARPS, PROGRAMS_PER_SM, MAX_SPLITS = 64, 64, 4, 4, 64
MODES = {"plain": 0, "stats": 1, "bn": 2}  # value only / + batch statistics / + BatchNorm gradient
# True: the running-statistics update happens inside the forward kernel (last program per feature
# block, int32 arrival counters). False: a second kernel and a num_updates.add_(1), the path
# before issue 19 (same results bit for bit); a switch in case the counters misbehave on a GPU.
FUSED_UPDATE = True
_SYNC: dict[torch.device, torch.Tensor] = {}  # per device: the arrival counters, zero between launches


def _cdiv(a: int, b: int) -> int:
    # Plain integer helpers: triton.cdiv / next_power_of_2 are ConstexprFunctions in Triton 3.x,
    # several microseconds of host time per call on this per-step path.
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _blocks(device: torch.device) -> tuple[int, int]:
    # Kernels on CPU tensors run in Triton's interpreter (TRITON_INTERPRET=1; resolve_backend refuses
    # them otherwise): small tiles there. Decided by the device, not by reading the environment on
    # every call.
    return (BLOCK_T, BLOCK_F) if device.type == "cuda" else (16, 16)


def num_splits(F: int, device: torch.device) -> int:
    """Token splits P of the statistics grid: a function of F and the device only (shapes of the
    fake tensors must not depend on T). About PROGRAMS_PER_SM programs per SM in all."""
    if device.type != "cuda":  # the interpreter
        return 3  # several splits, some empty at small T: exercises the combination
    return max(1, min(MAX_SPLITS, PROGRAMS_PER_SM * _sm_count(device) // _cdiv(F, _blocks(device)[1])))


def _grid(T: int, F: int, P: int, device: torch.device):
    """-> (grid, rows per split): P splits of whole BLOCK_T tiles (trailing ones may be empty)."""
    bt, bf = _blocks(device)
    rps = _cdiv(_cdiv(T, P), bt) * bt
    return (_cdiv(F, bf), P), rps


def _sync_counters(device: torch.device, blocks: int) -> torch.Tensor:
    """int32 (>= 1 + blocks,) zeros on `device`, shared by all calls: each _fwd_update_kernel launch
    leaves them zero again, and launches on one stream run one after another. Not safe for two
    of these kernels running concurrently on different streams (nothing here does that)."""
    buf = _SYNC.get(device)
    if buf is None or buf.numel() < 1 + blocks:
        buf = _SYNC[device] = torch.zeros(max(64, 1 + blocks), device=device, dtype=torch.int32)
    return buf


def _forward(x, weight, bias, running_mean, running_var, num_updates, eps, momentum, update):
    """x (T, F) contiguous -> y (T, F), aux (2 + 2P, F) with update, else (2, F); with update the
    running statistics and num_updates are updated in place."""
    T, F = x.shape
    bt, bf = _blocks(x.device)
    P = num_splits(F, x.device) if update else max(1, min(num_splits(F, x.device), _cdiv(T, bt)))
    y = torch.empty_like(x)
    aux = torch.empty((2 + 2 * P, F) if update else (2, F), device=x.device, dtype=torch.float32)
    grid, rps = _grid(T, F, P, x.device)
    p_pad = max(2, _pow2(P))
    if update and FUSED_UPDATE:
        sync = _sync_counters(x.device, grid[0])
        _fwd_update_kernel[grid](
            x, weight, bias, running_mean, running_var, num_updates, y, aux, sync, T, F, rps, P, x.stride(0),
            y.stride(0), eps, momentum, P_PAD=p_pad, BLOCK_T=bt, BLOCK_F=bf, num_warps=NUM_WARPS,
        )  # fmt: skip
        return y, aux
    _fwd_kernel[grid](
        x, weight, bias, running_mean, running_var, y, aux, T, F, rps, x.stride(0), y.stride(0), eps,
        STATS=update, BLOCK_T=bt, BLOCK_F=bf, num_warps=NUM_WARPS,
    )  # fmt: skip
    if update:
        _update_kernel[grid[:1]](
            aux, running_mean, running_var, num_updates, T, F, rps, P, momentum, P_PAD=p_pad, BLOCK_F=bf,
            num_warps=NUM_WARPS,
        )  # fmt: skip
        num_updates.add_(1)  # after the kernel (same stream), which read the old count
    return y, aux


def _backward(dy, x, weight, aux, eps, mode, need_x):
    T, F = x.shape
    bt, bf = _blocks(x.device)
    bn = mode == MODES["bn"]
    P_fwd = (aux.shape[0] - 2) // 2  # 0 in plain mode
    P = P_fwd if bn else max(1, min(num_splits(F, x.device), _cdiv(T, bt)))
    grid, rps = _grid(T, F, P, x.device)
    red = torch.empty((2 * P, F), device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    p_pad = max(2, _pow2(P))
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
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return _forward(x, weight, bias, running_mean, running_var, None, eps, 0.0, False)


@_fwd_op.register_fake
def _(x, weight, bias, running_mean, running_var, eps):
    return torch.empty_like(x), x.new_empty((2, x.shape[1]), dtype=torch.float32)


@torch.library.custom_op(
    "torchpeer::ema_norm_fwd_update", mutates_args=("running_mean", "running_var", "num_updates")
)  # fmt: skip
def _fwd_update_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, num_updates: torch.Tensor, eps: float, momentum: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return _forward(x, weight, bias, running_mean, running_var, num_updates, eps, momentum, True)


@_fwd_update_op.register_fake
def _(x, weight, bias, running_mean, running_var, num_updates, eps, momentum):
    F = x.shape[1]
    return torch.empty_like(x), x.new_empty((2 + 2 * num_splits(F, x.device), F), dtype=torch.float32)


@torch.library.custom_op("torchpeer::ema_norm_bwd", mutates_args=())
def _bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, aux: torch.Tensor, eps: float, mode: int, need_x: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy.contiguous(), x, weight, aux, eps, mode, need_x)


@_bwd_op.register_fake
def _(dy, x, weight, aux, eps, mode, need_x):
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    return dx, torch.empty_like(weight), torch.empty_like(weight)


class EMANormFunction(torch.autograd.Function):
    """y = ema_norm(x, ...) with one custom op per forward and one per backward (see the module
    docstring); x (T, F) contiguous, weight, bias, running_mean, running_var (F,), num_updates a
    0-dim int64 tensor; mode one of MODES (plain: no update). Differentiable in x, weight, bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_updates, eps, momentum, mode):
        update = mode != MODES["plain"]
        if call_implementation_directly(x):
            y, aux = _forward(x, weight, bias, running_mean, running_var, num_updates, eps, momentum, update)
            if update:  # what the mutating op's dispatch would do: autograd sees the buffers changed
                torch.autograd.graph.increment_version((running_mean, running_var, num_updates))
        elif update:
            y, aux = _fwd_update_op(x, weight, bias, running_mean, running_var, num_updates, eps, momentum)
        else:
            y, aux = _fwd_op(x, weight, bias, running_mean, running_var, eps)
        # aux holds the running statistics as read, so the in-place update does not reach the backward
        ctx.save_for_backward(x, weight, aux)
        ctx.eps, ctx.mode = eps, mode
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, aux = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_x or need_w or need_b):
            return (None,) * 9
        if call_implementation_directly(dy):
            dx, dw, db = _backward(dy.contiguous(), x, weight, aux, ctx.eps, ctx.mode, need_x)
        else:
            dx, dw, db = _bwd_op(dy, x, weight, aux, ctx.eps, ctx.mode, need_x)
        return (dx if need_x else None), (dw if need_w else None), (db if need_b else None), *(None,) * 6


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
    update = training and x.shape[0] > 1
    mode = (MODES["bn"] if bn_grad else MODES["stats"]) if update else MODES["plain"]
    args = (x.contiguous(), weight, bias, running_mean, running_var, num_updates, float(eps), float(momentum), mode)
    return EMANormFunction.apply(*args)
