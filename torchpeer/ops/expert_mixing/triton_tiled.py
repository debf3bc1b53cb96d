"""Tile-sorted expert-mixing forward (a measured prototype; not the default, see NOTES_mixing.md §5).

y[t] = sum_s g[t,s] * act(x[t] . u[e]) * v[e], e = indices[t, s]; x: (T, d), down (u), up (v): (N, d),
indices, gates: (T, H, K), S = H * K.

The token-centric forward (triton_kernels._mix_fwd_kernel) reads a u and a v row per selection from
DRAM (~2 rows x T*S). This variant splits it in two passes so that the u half can reuse rows:

pass A (h, expert-sorted inside token tiles): the T*S selections are sorted by the key
    (t // tile_tokens, expert). One program takes BLOCK_P consecutive positions of that order and
    computes h[p] = x[t_p] . u[e_p] (a scalar per selection, so no program owns a sum and no
    atomics are needed). Inside a tile every distinct expert's selections are adjacent, so its u row
    comes from DRAM once per tile (later copies hit L1/L2), and the tile's x rows (tile_tokens x
    2 KiB at d = 1024 bf16) stay L2-resident while the tile's programs run (programs start roughly
    in id order, which is the tile order). DRAM ~ pairs (distinct (tile, expert)) u rows, instead
    of T*S; the x rows move through L2 once per selection instead.
pass B (y, token-centric, one program per token): y[t] = sum_s g act(h) v[e]: one v row per
    selection from DRAM (a sum owned by the token: expert-sorted, it would need atomics).

Uniform routing: pairs / (T*S) = (1 - exp(-x)) / x, x = tile_tokens * S / N (0.63 at 8192 tokens,
0.43 at 16384, for N = 1024^2, S = 128). h has the token-centric kernel's meaning, (T, H, K) fp32,
so the existing backward takes it unchanged. Deterministic: each h is one program's dot product
and each y one program's fixed-order sum.
"""

import torch
import triton
import triton.language as tl

from .checks import ACTIVATIONS
from .triton_cols_kernels import _cols_rows_kernel

# Launch tuning, by the shape of what each kernel gathers (as triton_op.TUNING; unmeasured on a GPU):
# pass A gathers two rows per selection (u and x), like the token-centric forward -> its config;
# pass B gathers one (v), like the dx pass -> its config. tile_tokens: the token tile of pass A;
# dedup: pass A's DEDUP (share a repeated u row in registers instead of re-reading it).
TILED_TUNING = {
    "h": {"tile": 8192, "num_warps": {512: 2, 1024: 4}},
    "y": {"tile": 4096, "num_warps": {512: 1, 1024: 2}},
    "tile_tokens": 8192,
    "dedup": False,
}


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _tiled_h_kernel(
    x_ptr, down_ptr, keys_ptr, perm_ptr, h_ptr,
    n_sel, N, S, D, stride_x, stride_down,
    DEDUP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per BLOCK_P consecutive positions q of the (tile, expert)-sorted order:
    h[perm[q]] = x[perm[q] // S] . down[keys[q] % N] (keys = tile * N + expert, perm = flat t*S+s).

    DEDUP: a run of equal keys inside the block loads its u row once (the run's first lane) and
    shares it through registers (tl.gather), so repeats cost no L2 read; without it every lane
    loads its row and repeats are L1/L2 hits (the count in NOTES_mixing.md §5 brackets both)."""
    pid = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, BLOCK_P)
    offs_q = pid * BLOCK_P + lane
    qmask = offs_q < n_sel
    key = tl.load(keys_ptr + offs_q, mask=qmask, other=0).to(tl.int64)
    e = key % N
    p = tl.load(perm_ptr + offs_q, mask=qmask, other=0).to(tl.int64)
    tok = p // S
    offs_d = tl.arange(0, BLOCK_D)
    m2 = qmask[:, None] & (offs_d < D)[None, :]
    u_rows = down_ptr + e[:, None] * stride_down + offs_d[None, :]
    if DEDUP:
        # keys are sorted, so equal keys are adjacent: lane q leads its run if its key differs from
        # lane q-1's (lane 0 always leads); the leader of lane q is the last leader at or before q
        prev = tl.load(keys_ptr + offs_q - 1, mask=qmask & (lane > 0), other=-1).to(tl.int64)
        first = key != prev
        lead = tl.associative_scan(tl.where(first, lane, 0), 0, _max_combine)
        # u rows stream (each distinct row is wanted by this tile only: let it go first)
        u = tl.load(u_rows, mask=m2 & first[:, None], other=0.0, eviction_policy="evict_first")
        u = tl.gather(u, tl.broadcast_to(lead[:, None], [BLOCK_P, BLOCK_D]), axis=0)
    else:
        u = tl.load(u_rows, mask=m2, other=0.0, eviction_policy="evict_first")
    # x rows are the tile's working set, wanted by ~S programs each: keep them
    x_rows = x_ptr + tok[:, None] * stride_x + offs_d[None, :]
    xt = tl.load(x_rows, mask=m2, other=0.0, eviction_policy="evict_last")
    h = tl.sum(u.to(tl.float32) * xt.to(tl.float32), axis=1)  # (BLOCK_P,)
    tl.store(h_ptr + p, h, mask=qmask)


def _new_buffer(shape, dtype, device):
    """Uninitialised output buffer; every element is written by a kernel (a test poisons it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _config(kernel, d, s):
    """-> (BLOCK_D, BLOCK_ROWS, num_warps): whole rows, BLOCK_ROWS rows so the tile is ~TILED_TUNING's."""
    cfg = TILED_TUNING[kernel]
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(triton.next_power_of_2(max(1, s)), cfg["tile"] // block_d))
    warps = cfg["num_warps"]
    return block_d, rows, warps.get(block_d, min(16, max(1, warps[1024] * block_d // 1024)))


def sort_by_tile_and_expert(indices, n_experts, tile_tokens):
    """indices (T, H, K) -> (keys, perm), both (T*S,): perm lists the flat selection ids t*S + s in
    (token tile, expert, token) order (a stable sort), keys[q] = (t // tile_tokens) * N + expert of
    selection perm[q] (int32 when it fits: half the radix passes and bytes of int64)."""
    T = indices.shape[0]
    S = indices[0].numel()
    n_tiles = -(-T // tile_tokens)
    wide = n_tiles * n_experts >= 2**31
    kdt = torch.int64 if wide else torch.int32
    tile = (torch.arange(T, device=indices.device, dtype=kdt) // tile_tokens) * n_experts
    keys = (tile[:, None] + indices.reshape(T, S).to(kdt)).reshape(-1)
    keys, perm = torch.sort(keys, stable=True)
    return keys, perm


def tile_partition(sorted_experts, perm, S, tile_tokens):
    """The (tile, expert, token) order from the backward's order (a stable sort by expert alone:
    triton_op._sort_by_expert's perm and the sorted expert ids) by one more stable sort on the tile
    number alone (uint8 while there are at most 256 tiles: one radix pass instead of four).

    sorted_experts, perm: (T*S,) -> (experts, perm) in (tile, expert, token) order: the same perm as
    sort_by_tile_and_expert (both sorts stable), and experts[q] < N, which launch_h takes as keys
    (key % N is the expert either way). A forward that sorts by expert, keeps (perm, offsets) for
    the backward (which then skips its own sort) and partitions by tile pays this partition instead
    of a second full sort (NOTES_mixing.md §5.5)."""
    T = perm.numel() // max(1, S)
    kdt = torch.uint8 if -(-T // tile_tokens) <= 256 else torch.int32  # from shapes: no host sync
    _, order = torch.sort(((perm // S) // tile_tokens).to(kdt), stable=True)
    return sorted_experts[order], perm[order]


def expert_mix_tiled_forward(x, down, up, indices, gates, activation="gelu", tile_tokens=None):
    """The forward of expert mixing, tile-sorted (module docstring): -> (y, h).

    x: (T, d); down, up: (N, d) (fp16/bf16/fp32, any mix, as expert_mix_triton); indices, gates:
    (T, H, K). Returns y: (T, d) in x's dtype and h = x . down[indices]: (T, H, K) fp32, the same
    contract as triton_op._forward_impl (whose backward takes this h). No autograd, no input
    checks (callers: triton_op._forward_impl when TUNING["fwd"]["tile_tokens"] is set, benchmarks).
    tile_tokens: tokens per tile (default TILED_TUNING["tile_tokens"]); T need not be a multiple.
    """
    T, d = x.shape
    N = down.shape[0]
    S = indices[0].numel() if T else 0
    tile_tokens = int(tile_tokens or TILED_TUNING["tile_tokens"])
    y = _new_buffer((T, d), x.dtype, x.device)
    h = _new_buffer(indices.shape, torch.float32, x.device)
    if T == 0 or S == 0:
        return y.zero_(), h
    keys, perm = sort_by_tile_and_expert(indices, N, tile_tokens)
    launch_h(x, down, keys, perm, h)
    launch_y(up, indices, gates, h, y, activation)
    return y, h


def launch_h(x, down, keys, perm, h):
    """Pass A: h.view(-1)[perm[q]] = x[perm[q] // S] . down[keys[q] % N] for every sorted position q."""
    (T, d), N, S = x.shape, down.shape[0], h[0].numel()
    block_d, block_p, warps = _config("h", d, T * S)
    _tiled_h_kernel[(triton.cdiv(T * S, block_p),)](
        x, down, keys, perm, h, T * S, N, S, d, x.stride(0), down.stride(0),
        DEDUP=bool(TILED_TUNING.get("dedup")), BLOCK_P=block_p, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip


def launch_y(up, indices, gates, h, y, activation):
    """Pass B: y[t] = sum_s gates[t, s] act(h[t, s]) up[indices[t, s]]."""
    (T, d), S = y.shape, indices[0].numel()
    block_d, block_s, warps = _config("y", d, S)
    # the columns path's row kernel computes exactly this sum (one program per token, fp32 accumulator)
    _cols_rows_kernel[(T,)](
        h, gates, up, indices, y, S, d, up.stride(0), y.stride(0),
        ACT=ACTIVATIONS.index(activation), BLOCK_S=block_s, BLOCK_C=block_d, num_warps=warps,
    )  # fmt: skip
