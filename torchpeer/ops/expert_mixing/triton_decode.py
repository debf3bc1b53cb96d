"""Split-S expert-mixing forward for a handful of tokens (decoding; a prototype, not the default).

y[t] = sum_s g[t,s] * act(x[t] . u[e]) * v[e], e = indices[t, s]; x: (T, d), down (u), up (v): (N, d),
indices, gates: (T, H, K), S = H * K.

The token-centric forward (triton_kernels._mix_fwd_kernel) runs one program per token, which
walks its S = 128 selections in S / BLOCK_S = 16 dependent steps (ids, then the rows): at T = 1 one
program on one SM, ~10-20 us of latency for 0.5 MB of rows (NOTES_issue19.md §2). Here each token's
selections are cut into chunks of `split` selections, one program per (token, chunk), so the steps
run side by side on T * S / split programs:

pass 1 (grid (T, C), C = ceil(S / split)): program (t, c) computes h for its selections (stored,
    as the token-centric forward does) and part[t, c] = sum g act(h) v over them (fp32);
pass 2 (grid (T,)): y[t] = part[t, 0] + ... + part[t, C-1], in chunk order, cast to x's dtype.

No atomics and a fixed order: deterministic. Extra bytes: T * C * d * 4 written and read back
(32 KiB per token at C = 8, d = 1024), nothing next to the 0.5 MB of rows a token gathers.
The (y, h) contract is the token-centric forward's, so the existing backward takes its h.
"""

import torch
import triton
import triton.language as tl

from .checks import ACTIVATIONS
from .triton_kernels import _act, _gather_selections

# split: selections per program (16 at S = 128: 8 programs per token, each 2 blocks of 8 rows at
# d = 1024); tile / num_warps as triton_op.TUNING["fwd"] (the same two-row gather per selection).
SPLIT_TUNING = {"split": 16, "tile": 8192, "num_warps": {512: 2, 1024: 4}}


@triton.jit
def _split_fwd_kernel(
    x_ptr, down_ptr, up_ptr, idx_ptr, gate_ptr, part_ptr, h_ptr,
    S, D, SPLIT, C, stride_x, stride_down, stride_up,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program (t, c): h of selections [c*SPLIT, min(S, (c+1)*SPLIT)) of token t, and
    part[t, c] = sum over them of g * act(h) * v (fp32, (T, C, D) contiguous)."""
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    x = tl.load(x_ptr + t * stride_x + offs_d, mask=dmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = c * SPLIT
    end = tl.minimum(S, start + SPLIT)
    for s0 in range(start, end, BLOCK_S):
        offs_s, smask, g, u, v = _gather_selections(
            t, s0, S, end, idx_ptr, gate_ptr, down_ptr, up_ptr, stride_down, stride_up, offs_d, dmask, BLOCK_S
        )
        h = tl.sum(u.to(tl.float32) * x[None, :], axis=1)
        tl.store(h_ptr + t * S + offs_s, h, mask=smask)
        w = g * _act(h, ACT)  # masked lanes: g = 0
        acc += tl.sum(w[:, None] * v.to(tl.float32), axis=0)
    tl.store(part_ptr + (t * C + c) * D + offs_d, acc, mask=dmask)


@triton.jit
def _split_sum_kernel(part_ptr, y_ptr, C, D, stride_y, BLOCK_D: tl.constexpr):
    """Program t: y[t] = sum_c part[t, c] in chunk order (deterministic), in y's dtype."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in range(0, C):
        acc += tl.load(part_ptr + (t * C + c) * D + offs_d, mask=dmask, other=0.0)
    tl.store(y_ptr + t * stride_y + offs_d, acc.to(y_ptr.dtype.element_ty), mask=dmask)


def _new_buffer(shape, dtype, device):
    """Uninitialised output buffer; every element is written by a kernel (a test poisons it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _plan(d, S, split):
    """-> (BLOCK_D, BLOCK_S, num_warps, split rounded up to whole BLOCK_S blocks, chunks C per token)."""
    block_d = triton.next_power_of_2(d)
    block_s = max(1, min(triton.next_power_of_2(S), SPLIT_TUNING["tile"] // block_d))
    warps = SPLIT_TUNING["num_warps"]
    num_warps = warps.get(block_d, min(16, max(1, warps[1024] * block_d // 1024)))
    split = max(block_s, -(-int(split or SPLIT_TUNING["split"]) // block_s) * block_s)
    return block_d, block_s, num_warps, split, triton.cdiv(S, split)


def expert_mix_split_forward(x, down, up, indices, gates, activation="gelu", split=None):
    """The forward of expert mixing with each token's selections split over programs: -> (y, h).

    x: (T, d); down, up: (N, d) (fp16/bf16/fp32, any mix, as expert_mix_triton); indices, gates:
    (T, H, K). Returns y: (T, d) in x's dtype and h = x . down[indices]: (T, H, K) fp32, the
    contract of triton_op._forward_impl (callers: _forward_impl when T <= TUNING["fwd"]
    ["split_below"], benchmarks). No autograd, no input checks. split: selections per program
    (default SPLIT_TUNING["split"]), rounded up to whole BLOCK_S blocks.
    """
    T, d = x.shape
    S = indices[0].numel() if T else 0
    y = _new_buffer((T, d), x.dtype, x.device)
    h = _new_buffer(indices.shape, torch.float32, x.device)
    if T == 0 or S == 0:
        return y.zero_(), h
    block_d, block_s, num_warps, split, C = _plan(d, S, split)
    part = _new_buffer((T, C, d), torch.float32, x.device)
    _split_fwd_kernel[(T, C)](
        x, down, up, indices, gates, part, h,
        S, d, split, C, x.stride(0), down.stride(0), up.stride(0),
        ACT=ACTIVATIONS.index(activation), BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
    _split_sum_kernel[(T,)](part, y, C, d, y.stride(0), BLOCK_D=block_d, num_warps=num_warps)
    return y, h
