"""The Triton expert mixing: launch configs, launchers, torch.library custom ops, an autograd
Function over them (`ExpertMixFunction`), entry point expert_mix_triton.

The kernels and the algorithm they implement are in triton_kernels.py. In plain eager mode the
Function calls the implementations directly, skipping the ops' dispatch (host time, issue 19);
under torch.compile, on fake tensors or subclasses, or under a TorchDispatchMode it calls the
ops (ops.dispatch.call_implementation_directly). The Function's backward is the ops' registered
autograd formula (_backward), which makes the same choice.
"""

import torch
import triton

from ..dispatch import call_implementation_directly
from ..triton_segments import LaggedSplitCheck
from ..triton_segments import segment_plan as _segment_plan
from .checks import ACTIVATIONS, check_mix_inputs
from .triton_decode import expert_mix_split_forward
from .triton_kernels import _mix_bwd_dx_kernel, _mix_bwd_reduce_kernel, _mix_bwd_segment_kernel, _mix_fwd_kernel
from .triton_tiled import expert_mix_tiled_forward
from .triton_tiled_bwd import launch_expert_tiled, tile_plan

# Launch tuning per kernel, from the H200 sweeps in benchmarks/NOTES_mixing.md (T = 65536, S = 128):
#   tile: BLOCK_S * BLOCK_D, the elements of one gathered tile (BLOCK_S rows of BLOCK_D);
#   num_warps: {BLOCK_D: warps} as measured; other row lengths scale the 1024 entry.
# Small tiles and few warps win: the kernels are bound by memory latency, so what counts is how
# many programs fit on an SM (registers) and how few cross-warp reductions each iteration needs.
#   expert "segment": the most selections one backward program walks (rounded up to a multiple
#   of BLOCK_S); longer expert lists (hot experts of a skewed router) are split into segments
#   whose partial gradients a second small pass sums. Uniform routing at T*S / N ~ 8 never splits.
#   Auto: lists are split only when some expert owns more than `segment` selections (on CUDA
#   judged from an earlier call's count, read back without a sync: LaggedSplitCheck), so
#   near-uniform routing runs the unsplit kernel with no plan at all.
#   None: never split (not skew-robust).
#   fwd "tile_tokens" (absent/None by default): a token count selects the tile-sorted forward of
#   triton_tiled.py (a prototype being measured, NOTES_mixing.md §5) with that many tokens per tile.
#   expert "tile_tokens" (absent/None by default): the tile-sorted expert pass of triton_tiled_bwd.py
#   (a prototype, NOTES_mixing.md §5.3) with that many tokens per tile, unless some expert owns more
#   than `segment` selections of a tile (skew: the default pass, which splits hot experts).
#   fwd "split_below" (absent/None by default): batches of at most that many tokens (decoding) take
#   the split-S forward of triton_decode.py (a prototype being measured, NOTES_mixing.md §6).
# Mutable on purpose: benchmarks/bench_mixing.py sweeps it.
SEGMENT = 256
TUNING = {
    "fwd": {"tile": 8192, "num_warps": {512: 2, 1024: 4}},
    "expert": {"tile": 1024, "num_warps": {512: 1, 1024: 4}, "segment": SEGMENT},
    "dx": {"tile": 4096, "num_warps": {512: 1, 1024: 2}},
}


# ----------------------------------------------------------------------------- launchers


def _new_buffer(shape, dtype, device):
    """Uninitialised output buffer; every element is written by a kernel (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_config(kernel, d, s):
    """-> (BLOCK_D, BLOCK_S, num_warps) for `kernel` on rows of d elements, s selections per token.

    Whole rows per tile (BLOCK_D >= d), BLOCK_S rows so the tile stays ~TUNING[kernel]["tile"]."""
    cfg = TUNING[kernel]
    block_d = triton.next_power_of_2(d)
    block_s = max(1, min(triton.next_power_of_2(s), cfg["tile"] // block_d))
    warps = cfg["num_warps"]
    num_warps = warps.get(block_d, min(16, max(1, warps[1024] * block_d // 1024)))
    return block_d, block_s, num_warps


def _act_id(activation):
    return ACTIVATIONS.index(activation)


def _forward_impl(x, down, up, indices, gates, activation):
    """-> y (T, d) in x's dtype, h = x . u[idx] (T, H, K) float32."""
    T, d = x.shape
    S = indices[0].numel() if T else 0
    split_below = TUNING["fwd"].get("split_below")
    if split_below and T <= split_below:  # opt-in prototype, (y, h) as below
        return expert_mix_split_forward(x, down, up, indices, gates, activation)
    tile_tokens = TUNING["fwd"].get("tile_tokens")
    if tile_tokens:  # opt-in prototype: same (y, h) contract, so the backward is unchanged
        return expert_mix_tiled_forward(x, down, up, indices, gates, activation, tile_tokens)
    y = _new_buffer((T, d), x.dtype, x.device)
    h = _new_buffer(indices.shape, torch.float32, x.device)
    if T == 0 or S == 0:
        return y.zero_(), h
    block_d, block_s, num_warps = _launch_config("fwd", d, S)
    _mix_fwd_kernel[(T,)](
        x, down, up, indices, gates, y, h,
        S, d, x.stride(0), down.stride(0), up.stride(0), y.stride(0),
        ACT=_act_id(activation), BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    return y, h


def _sort_by_expert(indices, n_experts, with_keys=False):
    """-> perm (T*S,) int64: flat selection ids grouped by expert (stable: token order inside),
    offsets (N+1,) int64: expert e owns perm[offsets[e]:offsets[e+1]]; with_keys: also the sorted
    expert ids (T*S,) (int32 for N < 2^31)."""
    flat = indices.reshape(-1)
    # 32-bit keys halve the radix-sort passes; expert ids always fit for N < 2^31
    keys = flat.to(torch.int32) if n_experts < 2**31 else flat.to(torch.int64)
    sorted_keys, perm = torch.sort(keys, stable=True)
    bounds = torch.arange(n_experts + 1, device=keys.device, dtype=keys.dtype)
    offsets = torch.searchsorted(sorted_keys, bounds)  # first position >= e
    return (perm, offsets, sorted_keys) if with_keys else (perm, offsets)


_needs_split = LaggedSplitCheck()


def _expert_segments(offsets, n_selections, block_s):
    """The segments of an expert pass (TUNING["expert"]["segment"], _needs_split): (seg, nseg,
    pbase, seg_expert, seg_index, hot) as _segment_plan returns them, seg rounded up to whole blocks
    of block_s; when no expert list needs splitting, seg = 2**31 - 1 and empty plans (one program
    walks each whole list: the pre-segment kernel)."""
    seg = TUNING["expert"].get("segment", SEGMENT)
    if seg is None or not _needs_split(offsets, seg):
        none = torch.empty(0, dtype=torch.int64, device=offsets.device)
        return 2**31 - 1, none, none, none, none, none
    seg = max(block_s, (seg + block_s - 1) // block_s * block_s)  # whole blocks per segment
    return seg, *_segment_plan(offsets, n_selections, seg)


def _touched_only(n_selections, n_experts):
    """Run the expert pass over the touched experts only (gradients zeroed by a memset first)?
    TUNING["expert"]["touched_below"] = r: when T*S < r * N. Off (None) by default until measured:
    at T*S / N = 0.5 the one-program-per-expert pass spends most of its time writing zero rows
    (benchmarks/NOTES_issue19.md section 22)."""
    r = TUNING["expert"].get("touched_below")
    return r is not None and n_selections < r * n_experts


def _launch_expert(dy, x, up, gates, h, perm, offsets, ddown, dup, coef, dgate, activation, keys=None):
    """Expert-centric pass: one program per expert segment, then a reduce pass over the hot
    experts (those with more than one segment); writes ddown, dup, coef, dgate. With ``keys`` (the
    sorted expert ids), only the touched experts get a program, and ddown, dup must be zeros."""
    N, d = up.shape
    S = h[0].numel()
    block_d, block_s, num_warps = _launch_config("expert", d, S)
    seg, nseg, pbase, seg_expert, seg_index, hot = _expert_segments(offsets, h.numel(), block_s)
    # fp32 partial sums of the extra segments only: (T*S / seg) row pairs at most
    partial = torch.empty((max(1, seg_expert.numel()), 2, d), dtype=torch.float32, device=up.device)
    direct = N if keys is None else keys.numel()
    _mix_bwd_segment_kernel[(direct + seg_expert.numel(),)](
        x, dy, up, gates, h, perm, offsets, seg_expert, seg_index, partial,
        ddown, dup, coef, dgate, offsets if keys is None else keys,
        N, direct, S, d, seg, x.stride(0), dy.stride(0), up.stride(0), ddown.stride(0), dup.stride(0),
        ACT=_act_id(activation), BLOCK_S=block_s, BLOCK_D=block_d, TOUCHED=keys is not None, num_warps=num_warps,
    )  # fmt: skip
    if hot.numel():
        _mix_bwd_reduce_kernel[(hot.numel(),)](
            hot, nseg, pbase, partial, ddown, dup, d, ddown.stride(0), dup.stride(0),
            BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip


def _launch_dx(down, indices, coef, dx):
    """Token-centric pass: dx[t] = sum_s coef[t, s] * down[indices[t, s]]."""
    T, d = dx.shape
    S = indices[0].numel()
    block_d, block_s, num_warps = _launch_config("dx", d, S)
    _mix_bwd_dx_kernel[(T,)](
        down, indices, coef, dx, S, d, down.stride(0), dx.stride(0),
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip


def _backward_impl(dy, x, down, up, indices, gates, h, activation):
    """-> dx (x dtype), ddown (down dtype), dup (up dtype), dgates (gates dtype)."""
    T, d = x.shape
    N = down.shape[0]
    S = indices[0].numel() if T else 0
    dev = x.device
    if T == 0 or S == 0:
        return (
            torch.zeros_like(x),
            torch.zeros_like(down),
            torch.zeros_like(up),
            torch.zeros_like(gates),
        )
    dy = dy.contiguous()  # e.g. the expanded grad of y.sum() has stride 0
    touched = _touched_only(T * S, N)
    table_grad = torch.zeros if touched else _new_buffer  # touched-only: untouched rows stay zero
    ddown = table_grad(down.shape, dtype=down.dtype, device=dev)
    dup = table_grad(up.shape, dtype=up.dtype, device=dev)
    coef = _new_buffer((T * S,), torch.float32, dev)
    dgate = _new_buffer((T * S,), torch.float32, dev)

    tile_tokens = TUNING["expert"].get("tile_tokens")
    plan = tile_plan(indices, N, tile_tokens) if tile_tokens else None
    seg = TUNING["expert"].get("segment", SEGMENT)
    if plan is not None and (seg is None or not _needs_split(plan[1], seg)):  # opt-in prototype
        launch_expert_tiled(dy, x, up, gates, h, plan, ddown, dup, coef, dgate, activation)
    else:
        perm, offsets, keys = _sort_by_expert(indices, N, with_keys=True)
        keys = keys if touched else None
        _launch_expert(dy, x, up, gates, h, perm, offsets, ddown, dup, coef, dgate, activation, keys=keys)
    dx = _new_buffer((T, d), x.dtype, dev)
    _launch_dx(down, indices, coef, dx)
    return dx, ddown, dup, dgate.view(gates.shape).to(gates.dtype)


# ----------------------------------------------------------------------------- torch.library ops
# custom_op makes the kernels opaque to torch.compile (no graph breaks, shapes from register_fake).
# The forward op also returns h = x . u[idx] (T, H, K) fp32 so backward need not re-gather u rows.


@torch.library.custom_op("torchpeer::peer_mix_fwd", mutates_args=())
def _peer_mix_fwd(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_impl(x, down, up, indices, gates, activation)


@_peer_mix_fwd.register_fake
def _(x, down, up, indices, gates, activation):
    return x.new_empty(x.shape), x.new_empty(indices.shape, dtype=torch.float32)


@torch.library.custom_op("torchpeer::peer_mix_bwd", mutates_args=())
def _peer_mix_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    h: torch.Tensor,
    activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(dy, x, down, up, indices, gates, h, activation)


@_peer_mix_bwd.register_fake
def _(dy, x, down, up, indices, gates, h, activation):
    return x.new_empty(x.shape), down.new_empty(down.shape), up.new_empty(up.shape), gates.new_empty(gates.shape)


def _setup_context(ctx, inputs, output):
    x, down, up, indices, gates, activation = inputs
    _, h = output
    ctx.save_for_backward(x, down, up, indices, gates, h)
    ctx.activation = activation
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)  # no zero (T, H, K) gradient memset for h, which has none


def _backward(ctx, dy, _dh):
    if dy is None:  # the output did not reach the loss
        return None, None, None, None, None, None
    x, down, up, indices, gates, h = ctx.saved_tensors
    bwd = _backward_impl if call_implementation_directly(dy) else _peer_mix_bwd
    dx, ddown, dup, dgates = bwd(dy, x, down, up, indices, gates, h, ctx.activation)
    return dx, ddown, dup, None, dgates, None


_peer_mix_fwd.register_autograd(_backward, setup_context=_setup_context)


class ExpertMixFunction(torch.autograd.Function):
    """y = expert_mix(x, down, up, indices, gates) with one custom op per forward and one per
    backward (or their implementations, in eager mode); the same formula as the ops' registered
    autograd (_setup_context, _backward). Returns y only (h stays in the context)."""

    @staticmethod
    def forward(ctx, x, down, up, indices, gates, activation):
        if call_implementation_directly(x):
            y, h = _forward_impl(x, down, up, indices, gates, activation)
        else:
            y, h = _peer_mix_fwd(x, down, up, indices, gates, activation)
        ctx.save_for_backward(x, down, up, indices, gates, h)
        ctx.activation = activation
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _backward(ctx, dy, None)  # the op's own formula; it picks the op or the implementation


# ----------------------------------------------------------------------------- entry point


def expert_mix_triton(x, down, up, indices, gates, activation="gelu", deterministic=False):
    """y[t] = sum_{h,k} gates[t,h,k] * act(x[t] . down[i]) * up[i], i = indices[t,h,k]; Triton kernels.

    x: (T, d) fp16/bf16/fp32; down, up: (N, d) fp16/bf16/fp32 (may differ from x's dtype, e.g.
    fp32 master tables with bf16 activations: rows are converted in registers, never copied);
    indices: (T, H, K) int32/int64 in [0, N); gates: (T, H, K) any float dtype.
    Returns y: (T, d) in x's dtype (fp32 accumulation). Differentiable w.r.t. x, down, up and
    gates; each gradient comes back in its input's dtype.

    Under torch.autocast, x is cast to the autocast dtype (so y is in it); the tables are read
    in their own dtype. activation: "gelu" (exact erf), "relu" or "identity" (the linear read-out).
    deterministic: accepted for API symmetry; every path is already deterministic (no atomics,
    fixed summation order), so it changes nothing.
    Indices outside [0, N) are only checked for CPU tensors (a GPU check would need a host sync).
    """
    del deterministic  # always deterministic, see docstring
    check_mix_inputs(x, down, up, indices, gates, activation, kernel=True)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    if down.stride(1) != 1:
        down = down.contiguous()
    if up.stride(1) != 1:
        up = up.contiguous()
    return ExpertMixFunction.apply(x.contiguous(), down, up, indices.contiguous(), gates.contiguous(), activation)
