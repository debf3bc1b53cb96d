"""Triton expert mixing for PEER: y[t] = sum_{h,k} g[t,h,k] * act(x[t] . u[i]) * v[i], i = idx[t,h,k].

Shapes: x: (T, d); down (the u table), up (the v table): (N, d); indices, gates: (T, H, K).
S = H * K is the number of selections (retrieved experts) per token.

The op is memory-bound: every selection touches a random 2-row slice of two huge tables
(N = 1024^2 experts), so the kernels are organised around the bytes they move, and never
write (T*S, d)-sized gathered rows:

forward (token-centric, one program per token):
    for each block of selections: gather u rows, h = x . u, save h (T, S) for backward,
    gather v rows, acc += g * act(h) * v.          bytes ~ T*S * 2 rows
backward pass 1 (expert-centric, one program per expert):
    selections are sorted by expert id (a stable sort of the T*S indices), so a program loads
    v_e once (u_e is not needed) and walks its token list reading x[t] and dy[t]:
        s = dy[t] . v_e,  dgate = act(h) * s,  coef = g * act'(h) * s
        du_e += coef * x[t],  dv_e += g * act(h) * dy[t]
    and writes each table-gradient row exactly once (zero for experts nobody picked), plus
    dgate and coef into (T, S) buffers.            bytes ~ T*S * 2 rows + 1 table read + 2 written
backward pass 2 (token-centric): dx[t] = sum_s coef[t, s] * u[idx[t, s]].   bytes ~ T*S * 1 row

No atomics anywhere and a fixed summation order, so forward and backward are deterministic
(bit-identical across runs); the `deterministic` flag is therefore a documented no-op.
Table gradients come out in the table dtype (bf16 tables -> bf16 grads), accumulated in fp32.
On one H200 (T = 65536, d = 1024, N = 1024^2, H*K = 128, bf16) fwd + bwd takes 24.1 ms against a
~22.5 ms byte floor, with 4.8 GiB of memory above the tables; benchmarks/NOTES_mixing.md has the
byte counts and every measured version.
"""

import torch
import triton
import triton.language as tl

ACTIVATIONS = ("gelu", "relu")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_D = 16384  # whole rows live in registers; beyond this they would spill

# Launch tuning per kernel, from the H200 sweeps in benchmarks/NOTES_mixing.md (T = 65536, S = 128):
#   tile: BLOCK_S * BLOCK_D, the elements of one gathered tile (BLOCK_S rows of BLOCK_D);
#   num_warps: {BLOCK_D: warps} as measured; other row lengths scale the 1024 entry.
# Small tiles and few warps win: the kernels are bound by memory latency, so what counts is how
# many programs fit on an SM (registers) and how few cross-warp reductions each iteration needs.
# Mutable on purpose: benchmarks/bench_mixing.py sweeps it.
TUNING = {
    "fwd": {"tile": 8192, "num_warps": {512: 2, 1024: 4}},
    "expert": {"tile": 1024, "num_warps": {512: 1, 1024: 4}},
    "dx": {"tile": 4096, "num_warps": {512: 1, 1024: 2}},
}


def peer_mix_naive(x, down, up, indices, gates, activation="gelu"):
    """Reference expert mixing that materialises the gathered rows (T, H, K, d). Tests only.

    x: (T, d); down, up: (N, d); indices, gates: (T, H, K) -> y: (T, d) in x's dtype.
    Computes in float32 (float64 if any input is float64) and is differentiable w.r.t.
    x, down, up and gates through plain autograd.
    """
    cdt = torch.float64 if torch.float64 in (x.dtype, down.dtype, up.dtype, gates.dtype) else torch.float32
    u = down.to(cdt)[indices]  # (T, H, K, d)
    v = up.to(cdt)[indices]  # (T, H, K, d)
    h = torch.einsum("td,thkd->thk", x.to(cdt), u)
    a = torch.nn.functional.gelu(h) if activation == "gelu" else torch.relu(h)
    y = torch.einsum("thk,thkd->td", gates.to(cdt) * a, v)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _act(h, ACT: tl.constexpr):
    # ACT 0: exact (erf) GELU, as torch.nn.functional.gelu's default; ACT 1: ReLU
    if ACT == 0:
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    else:
        return tl.maximum(h, 0.0)


@triton.jit
def _act_and_grad(h, ACT: tl.constexpr):
    """Returns (act(h), act'(h)); ReLU'(0) = 0 like torch's relu backward."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327  # 1 / sqrt(2 pi)
        return h * cdf, cdf + h * pdf
    else:
        return tl.maximum(h, 0.0), tl.where(h > 0.0, 1.0, 0.0)


@triton.jit
def _mix_fwd_kernel(
    x_ptr, down_ptr, up_ptr, idx_ptr, gate_ptr, y_ptr, h_ptr,
    S, D, stride_x, stride_down, stride_up, stride_y,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per token t: y[t] = sum_s g * act(x[t] . u[idx]) * v[idx]; also saves h = x . u."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    x = tl.load(x_ptr + t * stride_x + offs_d, mask=dmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < S
        e = tl.load(idx_ptr + t * S + offs_s, mask=smask, other=0).to(tl.int64)
        g = tl.load(gate_ptr + t * S + offs_s, mask=smask, other=0.0).to(tl.float32)
        m2 = smask[:, None] & dmask[None, :]
        # issue both gathers before any use so both are in flight together
        u = tl.load(down_ptr + e[:, None] * stride_down + offs_d[None, :], mask=m2, other=0.0)
        v = tl.load(up_ptr + e[:, None] * stride_up + offs_d[None, :], mask=m2, other=0.0)
        h = tl.sum(u.to(tl.float32) * x[None, :], axis=1)  # (BLOCK_S,)
        tl.store(h_ptr + t * S + offs_s, h, mask=smask)
        w = g * _act(h, ACT)  # masked lanes: g = 0
        acc += tl.sum(w[:, None] * v.to(tl.float32), axis=0)
    tl.store(y_ptr + t * stride_y + offs_d, acc.to(y_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _mix_bwd_expert_kernel(
    x_ptr, dy_ptr, up_ptr, gate_ptr, h_ptr, perm_ptr, offsets_ptr,
    ddown_ptr, dup_ptr, coef_ptr, dgate_ptr,
    S, D, stride_x, stride_dy, stride_up, stride_ddown, stride_dup,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per expert e: walks the selections p (sorted by expert) with idx[p] == e.

    Writes ddown[e] = sum_p coef_p x[t_p], dup[e] = sum_p g_p act(h_p) dy[t_p] (zero rows for
    unused experts), and per selection coef_p = g act'(h) (dy . v_e), dgate_p = act(h) (dy . v_e).
    u_e itself is never needed here: dU only needs coef and x.
    """
    e = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    # masked loads move no bytes: unused experts skip reading v_e.
    # (the limit goes through tl.where: the interpreter rejects block & scalar-bool masks)
    v_e = tl.load(up_ptr + e * stride_up + offs_d, mask=offs_d < tl.where(end > start, D, 0), other=0.0)
    v_e = v_e.to(tl.float32)
    du = tl.zeros([BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    offs_p = start + tl.arange(0, BLOCK_S)
    p_next = tl.load(perm_ptr + offs_p, mask=offs_p < end, other=0).to(tl.int64)
    for p0 in range(start, end, BLOCK_S):
        offs_p = p0 + tl.arange(0, BLOCK_S)
        pmask = offs_p < end
        p = p_next  # flat selection ids t * S + s of this block
        tok = p // S
        g = tl.load(gate_ptr + p, mask=pmask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + p, mask=pmask, other=0.0)
        m2 = pmask[:, None] & dmask[None, :]
        xt = tl.load(x_ptr + tok[:, None] * stride_x + offs_d[None, :], mask=m2, other=0.0)
        dyt = tl.load(dy_ptr + tok[:, None] * stride_dy + offs_d[None, :], mask=m2, other=0.0)
        # prefetch the next block's ids while these rows are in flight: one memory latency per
        # iteration instead of two (perm -> rows); 12% faster at d = 512 (NOTES_mixing.md)
        offs_n = offs_p + BLOCK_S
        p_next = tl.load(perm_ptr + offs_n, mask=offs_n < end, other=0).to(tl.int64)
        dyt = dyt.to(tl.float32)
        s = tl.sum(dyt * v_e[None, :], axis=1)  # dy[t] . v_e, (BLOCK_S,)
        a, da = _act_and_grad(h, ACT)
        coef = g * da * s
        tl.store(dgate_ptr + p, a * s, mask=pmask)
        tl.store(coef_ptr + p, coef, mask=pmask)
        du += tl.sum(coef[:, None] * xt.to(tl.float32), axis=0)
        dv += tl.sum((g * a)[:, None] * dyt, axis=0)
    tl.store(ddown_ptr + e * stride_ddown + offs_d, du.to(ddown_ptr.dtype.element_ty), mask=dmask)
    tl.store(dup_ptr + e * stride_dup + offs_d, dv.to(dup_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _mix_bwd_dx_kernel(
    down_ptr, idx_ptr, coef_ptr, dx_ptr,
    S, D, stride_down, stride_dx,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per token t: dx[t] = sum_s coef[t, s] * u[idx[t, s]]."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < S
        e = tl.load(idx_ptr + t * S + offs_s, mask=smask, other=0).to(tl.int64)
        c = tl.load(coef_ptr + t * S + offs_s, mask=smask, other=0.0)
        m2 = smask[:, None] & dmask[None, :]
        u = tl.load(down_ptr + e[:, None] * stride_down + offs_d[None, :], mask=m2, other=0.0)
        acc += tl.sum(c[:, None] * u.to(tl.float32), axis=0)
    tl.store(dx_ptr + t * stride_dx + offs_d, acc.to(dx_ptr.dtype.element_ty), mask=dmask)


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


def _sort_by_expert(indices, n_experts):
    """-> perm (T*S,) int64: flat selection ids grouped by expert (stable: token order inside),
    offsets (N+1,) int64: expert e owns perm[offsets[e]:offsets[e+1]]."""
    flat = indices.reshape(-1)
    # 32-bit keys halve the radix-sort passes; expert ids always fit for N < 2^31
    keys = flat.to(torch.int32) if n_experts < 2**31 else flat.to(torch.int64)
    sorted_keys, perm = torch.sort(keys, stable=True)
    bounds = torch.arange(n_experts + 1, device=keys.device, dtype=keys.dtype)
    offsets = torch.searchsorted(sorted_keys, bounds)  # first position >= e
    return perm, offsets


def _launch_expert(dy, x, up, gates, h, perm, offsets, ddown, dup, coef, dgate, activation):
    """Expert-centric pass: one program per expert; writes ddown, dup, coef, dgate."""
    N, d = up.shape
    S = h[0].numel()
    block_d, block_s, num_warps = _launch_config("expert", d, S)
    _mix_bwd_expert_kernel[(N,)](
        x, dy, up, gates, h, perm, offsets, ddown, dup, coef, dgate,
        S, d, x.stride(0), dy.stride(0), up.stride(0), ddown.stride(0), dup.stride(0),
        ACT=_act_id(activation), BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
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
    perm, offsets = _sort_by_expert(indices, N)
    ddown = _new_buffer(down.shape, down.dtype, dev)
    dup = _new_buffer(up.shape, up.dtype, dev)
    coef = _new_buffer((T * S,), torch.float32, dev)
    dgate = _new_buffer((T * S,), torch.float32, dev)

    _launch_expert(dy, x, up, gates, h, perm, offsets, ddown, dup, coef, dgate, activation)
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


def _backward(ctx, dy, _dh):
    x, down, up, indices, gates, h = ctx.saved_tensors
    dx, ddown, dup, dgates = _peer_mix_bwd(dy, x, down, up, indices, gates, h, ctx.activation)
    return dx, ddown, dup, None, dgates, None


_peer_mix_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public entry point


def _interpreted():
    """True when the kernels were built by Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_mix_fwd_kernel, triton.runtime.JITFunction)


def _check_inputs(x, down, up, indices, gates, activation):
    if not all(isinstance(a, torch.Tensor) for a in (x, down, up, indices, gates)):
        raise TypeError("peer_mix_triton: x, down, up, indices and gates must all be torch.Tensors")
    if activation not in ACTIVATIONS:
        raise ValueError(f"peer_mix_triton: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 2:
        raise ValueError(f"peer_mix_triton: x must be (tokens, d_model); got shape {tuple(x.shape)}")
    if down.dim() != 2 or down.shape != up.shape or down.shape[1] != x.shape[1]:
        raise ValueError(
            "peer_mix_triton: down and up must both be (n_experts, d_model) with d_model = "
            f"x.shape[1] = {x.shape[1]}; got down {tuple(down.shape)}, up {tuple(up.shape)}"
        )
    if indices.dim() != 3 or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"peer_mix_triton: indices must be (tokens, heads, top_k) with tokens = {x.shape[0]}; "
            f"got shape {tuple(indices.shape)}"
        )
    if gates.shape != indices.shape:
        raise ValueError(
            f"peer_mix_triton: gates must have the shape of indices {tuple(indices.shape)}; got {tuple(gates.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"peer_mix_triton: indices must be int32 or int64; got {indices.dtype}")
    for name, t in (("x", x), ("down", down), ("up", up)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"peer_mix_triton: {name} must be float16, bfloat16 or float32; got {t.dtype}")
    if not gates.is_floating_point():
        raise TypeError(f"peer_mix_triton: gates must be a floating-point tensor; got {gates.dtype}")
    if x.shape[1] > _MAX_D:
        raise ValueError(f"peer_mix_triton: d_model = {x.shape[1]} > {_MAX_D} is not supported")
    devices = {t.device for t in (x, down, up, indices, gates)}
    if len(devices) != 1:
        raise ValueError(f"peer_mix_triton: all inputs must be on one device; got {sorted(map(str, devices))}")
    if x.device.type != "cuda" and not _interpreted():
        raise ValueError(
            "peer_mix_triton needs CUDA tensors (or TRITON_INTERPRET=1 set before torchpeer.kernels "
            "is imported, for testing on CPU); use the pure-PyTorch backend (peer_mix_torch) on CPU"
        )
    if x.device.type == "cpu" and indices.numel() and not torch.compiler.is_compiling():
        # only checked on CPU: on a GPU the check would cost a host sync every step
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= down.shape[0]:
            raise ValueError(f"peer_mix_triton: indices must lie in [0, {down.shape[0]}); got [{lo}, {hi}]")


def peer_mix_triton(x, down, up, indices, gates, activation="gelu", deterministic=False):
    """y[t] = sum_{h,k} gates[t,h,k] * act(x[t] . down[i]) * up[i], i = indices[t,h,k]; Triton kernels.

    x: (T, d) fp16/bf16/fp32; down, up: (N, d) fp16/bf16/fp32 (may differ from x's dtype, e.g.
    fp32 master tables with bf16 activations: rows are converted in registers, never copied);
    indices: (T, H, K) int32/int64 in [0, N); gates: (T, H, K) any float dtype.
    Returns y: (T, d) in x's dtype (fp32 accumulation). Differentiable w.r.t. x, down, up and
    gates; each gradient comes back in its input's dtype.

    Under torch.autocast, x is cast to the autocast dtype (so y is in it); the tables are read
    in their own dtype. activation: "gelu" (exact erf) or "relu".
    deterministic: accepted for API symmetry; every path is already deterministic (no atomics,
    fixed summation order), so it changes nothing.
    Indices outside [0, N) are only checked for CPU tensors (a GPU check would need a host sync).
    """
    del deterministic  # always deterministic, see docstring
    _check_inputs(x, down, up, indices, gates, activation)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        x = x.to(torch.get_autocast_dtype(dev))
    if down.stride(1) != 1:
        down = down.contiguous()
    if up.stride(1) != 1:
        up = up.contiguous()
    y, _ = _peer_mix_fwd(x.contiguous(), down, up, indices.contiguous(), gates.contiguous(), activation)
    return y
