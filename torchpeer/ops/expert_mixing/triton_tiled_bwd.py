"""Tile-sorted expert pass of the mixing backward (a measured prototype; not the default; see
benchmarks/NOTES_mixing.md §5.3 for its byte count and when it can pay).

Shapes: x, dy: (T, d); up (v table): (N, d); gates, h: (T, H, K), S = H * K; outputs ddown, dup: (N, d)
in the table dtypes, coef, dgate: (T*S,) fp32 (as triton_op._launch_expert).

The default expert pass (triton_kernels._mix_bwd_segment_kernel) sorts the selections by expert
over all T tokens: each expert reads v_e once, but the x and dy rows of its selections are random
over all tokens and come from DRAM (2 rows per selection). Here the selections are sorted by
(token tile, expert) and each tile is processed by two launches while its rows stay in L2:

dV pass (grid N, one program per expert, tile i): reads v_e, and for each selection p of e in the
    tile: dy[t] (L2), s = dy . v_e, coef = g act'(h) s, dgate = act(h) s (stored per selection),
    dv += g act(h) dy[t]; then dV[e] = dv if tile i is the first tile where e appears (or i = 0 and
    e appears nowhere: a zero row), else dV[e] += dv (read-modify-write of the table-dtype row).
dU pass (grid N, tile i): du = sum coef_p x[t_p] (x rows from L2), dU[e] written or updated alike.

Tiles run in launch order, so each row's updates come in tile order: deterministic. With bf16
tables a gradient row is rounded once per tile it appears in (the default rounds once). Bytes
(uniform routing): v rows and the read-modify-writes once per (tile, expert) pair instead of x and
dy rows per selection; it pays only for tiles of ~16k tokens (34 MB of x or dy in L2) at 32k-64k
tokens, and loses at 8k-token tiles (NOTES_mixing.md §5.3). Not skew-robust (one program walks an
expert's whole list in a tile): triton_op falls back to the default pass under skew.
"""

import torch
import triton
import triton.language as tl

from .checks import ACTIVATIONS
from .triton_kernels import _act_and_grad
from .triton_tiled import sort_by_tile_and_expert

# One selection row per step and 4 warps at d = 1024, as the default expert pass (its H200 sweep:
# latency-bound programs want few registers); num_warps scales with the row length.
TILED_BWD_TUNING = {"tile": 1024, "num_warps": {512: 1, 1024: 4}}


@triton.jit
def _pair_of_program(e, tile, N, offsets_ptr, first_tile_ptr):
    """-> (start, end, first): expert e's selections in `tile` are sorted positions [start, end);
    first: this tile writes the expert's row (the first tile it appears in; tile 0 for unused experts)."""
    start = tl.load(offsets_ptr + tile * N + e)
    end = tl.load(offsets_ptr + tile * N + e + 1)
    first = tl.load(first_tile_ptr + e) == tile
    return start, end, first


@triton.jit
def _store_or_add(row_ptr, acc, offs_d, D, first, nonempty):
    """Row <- acc (first) or row + acc (later tiles, only if this tile had selections of the expert)."""
    old = tl.load(row_ptr + offs_d, mask=offs_d < tl.where(nonempty & (first == 0), D, 0), other=0.0)
    acc = acc + old.to(tl.float32)
    tl.store(row_ptr + offs_d, acc.to(row_ptr.dtype.element_ty), mask=offs_d < tl.where(first | nonempty, D, 0))


@triton.jit
def _tiled_dv_kernel(
    dy_ptr, up_ptr, gate_ptr, h_ptr, perm_ptr, offsets_ptr, first_tile_ptr, dup_ptr, coef_ptr, dgate_ptr,
    tile, N, S, D, stride_dy, stride_up, stride_dup,
    ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program e, one tile: coef and dgate of e's selections in the tile, and dV[e] (module docstring)."""
    e = tl.program_id(0).to(tl.int64)
    start, end, first = _pair_of_program(e, tile, N, offsets_ptr, first_tile_ptr)
    nonempty = end > start
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    # masked loads move no bytes: experts absent from the tile skip v_e
    v_e = tl.load(up_ptr + e * stride_up + offs_d, mask=offs_d < tl.where(nonempty, D, 0), other=0.0)
    v_e = v_e.to(tl.float32)
    dv = tl.zeros([BLOCK_D], dtype=tl.float32)
    for q0 in range(start, end, BLOCK_S):
        offs_q = q0 + tl.arange(0, BLOCK_S)
        qmask = offs_q < end
        p = tl.load(perm_ptr + offs_q, mask=qmask, other=0).to(tl.int64)  # flat selection t * S + s
        tok = p // S
        g = tl.load(gate_ptr + p, mask=qmask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + p, mask=qmask, other=0.0)
        m2 = qmask[:, None] & dmask[None, :]
        # dy rows are the tile's working set (read by ~S programs each): keep them in L2
        dyt = tl.load(dy_ptr + tok[:, None] * stride_dy + offs_d[None, :], mask=m2, other=0.0,
                      eviction_policy="evict_last").to(tl.float32)  # fmt: skip
        s = tl.sum(dyt * v_e[None, :], axis=1)
        a, da = _act_and_grad(h, ACT)
        tl.store(coef_ptr + p, g * da * s, mask=qmask)
        tl.store(dgate_ptr + p, a * s, mask=qmask)
        dv += tl.sum((g * a)[:, None] * dyt, axis=0)
    _store_or_add(dup_ptr + e * stride_dup, dv, offs_d, D, first, nonempty)


@triton.jit
def _tiled_du_kernel(
    x_ptr, coef_ptr, perm_ptr, offsets_ptr, first_tile_ptr, ddown_ptr,
    tile, N, S, D, stride_x, stride_ddown,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Program e, one tile: dU[e] from the coef the dV pass of the same tile stored."""
    e = tl.program_id(0).to(tl.int64)
    start, end, first = _pair_of_program(e, tile, N, offsets_ptr, first_tile_ptr)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    du = tl.zeros([BLOCK_D], dtype=tl.float32)
    for q0 in range(start, end, BLOCK_S):
        offs_q = q0 + tl.arange(0, BLOCK_S)
        qmask = offs_q < end
        p = tl.load(perm_ptr + offs_q, mask=qmask, other=0).to(tl.int64)
        c = tl.load(coef_ptr + p, mask=qmask, other=0.0)
        m2 = qmask[:, None] & dmask[None, :]
        xt = tl.load(x_ptr + (p // S)[:, None] * stride_x + offs_d[None, :], mask=m2, other=0.0,
                     eviction_policy="evict_last").to(tl.float32)  # fmt: skip
        du += tl.sum(c[:, None] * xt, axis=0)
    _store_or_add(ddown_ptr + e * stride_ddown, du, offs_d, D, first, end > start)


def tile_plan(indices, n_experts, tile_tokens):
    """-> (perm, offsets, first_tile, n_tiles): perm as sort_by_tile_and_expert's; offsets
    (n_tiles*N + 1,) int64: expert e's selections in tile i are perm[offsets[i*N+e] : offsets[i*N+e+1]];
    first_tile (N,) int32: the first tile where e appears (0 if none). Shapes only: no host sync."""
    T = indices.shape[0]
    n_tiles = -(-T // tile_tokens)
    keys, perm = sort_by_tile_and_expert(indices, n_experts, tile_tokens)
    bounds = torch.arange(n_tiles * n_experts + 1, device=keys.device, dtype=keys.dtype)
    offsets = torch.searchsorted(keys, bounds)
    present = (offsets[1:] - offsets[:-1]).view(n_tiles, n_experts) > 0
    first_tile = present.to(torch.uint8).argmax(0).to(torch.int32)  # the first max; all-zero -> 0
    return perm, offsets, first_tile, n_tiles


def launch_expert_tiled(dy, x, up, gates, h, plan, ddown, dup, coef, dgate, activation):
    """The tile-sorted expert pass: writes ddown, dup (every row), coef and dgate (every selection).
    plan: tile_plan(indices, N, tile_tokens). Same outputs as triton_op._launch_expert."""
    perm, offsets, first_tile, n_tiles = plan
    N, d = up.shape
    S = h[0].numel()
    block_d = triton.next_power_of_2(d)
    block_s = max(1, min(triton.next_power_of_2(S), TILED_BWD_TUNING["tile"] // block_d))
    warps = TILED_BWD_TUNING["num_warps"]
    num_warps = warps.get(block_d, min(16, max(1, warps[1024] * block_d // 1024)))
    act = ACTIVATIONS.index(activation)
    for tile in range(n_tiles):  # tile order = update order of every row: deterministic
        _tiled_dv_kernel[(N,)](
            dy, up, gates, h, perm, offsets, first_tile, dup, coef, dgate,
            tile, N, S, d, dy.stride(0), up.stride(0), dup.stride(0),
            ACT=act, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
        _tiled_du_kernel[(N,)](
            x, coef, perm, offsets, first_tile, ddown,
            tile, N, S, d, x.stride(0), ddown.stride(0),
            BLOCK_S=block_s, BLOCK_D=block_d, num_warps=num_warps,
        )  # fmt: skip
