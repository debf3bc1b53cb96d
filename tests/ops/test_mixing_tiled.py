"""Tests of the tile-sorted mixing forward (torchpeer/ops/expert_mixing/triton_tiled.py) vs float64.

Runs in Triton's CPU interpreter without a GPU, so sizes are tiny; tile_tokens is scaled down with
them (2-8 tokens per tile) so that every case has several tiles, a ragged last tile, experts that
appear in some tiles only, and (N large) tiles where most experts are absent. The backward is the
unchanged token-centric one, fed the h of the tiled forward (selected by TUNING["fwd"]["tile_tokens"]).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import pytest  # noqa: E402

pytest.importorskip("triton")

from tests.ops.test_mixing_triton import DEVICE, check_against_float64, make_inputs  # noqa: E402
from tests.references import naive_float64, rel_err  # noqa: E402
from torchpeer.ops.expert_mixing import triton_op as mixing  # noqa: E402
from torchpeer.ops.expert_mixing import triton_tiled as tiled  # noqa: E402


@pytest.fixture(params=[False, True], ids=["loads", "dedup"])
def dedup(request, monkeypatch):
    """Pass A with every lane loading its u row, and with repeated rows shared in registers."""
    monkeypatch.setitem(tiled.TILED_TUNING, "dedup", request.param)
    return request.param


@pytest.fixture
def tiled_forward(monkeypatch):
    """Route expert_mix_triton's forward through the tiled kernels with `tile_tokens` per tile."""

    def use(tile_tokens):
        monkeypatch.setitem(mixing.TUNING, "fwd", dict(mixing.TUNING["fwd"], tile_tokens=tile_tokens))

    return use


def _h_float64(x, down, indices):
    return torch.einsum("td,thkd->thk", x.double(), down.double()[indices])


# (T, H, K, d, N, tile_tokens, activation): T not a multiple of the tile; one token per tile; one
# tile larger than T; N >> T*S (most experts absent from every tile); N < S (experts repeat a lot)
CASES = [
    (37, 2, 3, 48, 64, 8, "gelu"),
    (13, 1, 5, 64, 7, 1, "relu"),
    (7, 4, 12, 40, 64, 16, "gelu"),
    (23, 3, 1, 17, 4096, 5, "relu"),
]
# the gradients: the unchanged backward fed the tiled forward's h, the last case with N = 128 (still
# most experts absent from every tile): its expert pass runs one program per expert, and at
# N = 4096 that took 16 s in the interpreter (the forward test above keeps N = 4096)
GRAD_CASES = CASES[:3] + [(23, 3, 1, 17, 128, 5, "relu")]


@pytest.mark.parametrize("T,H,K,d,N,tile,activation", CASES)
def test_forward_y_and_h_match_float64(dedup, T, H, K, d, N, tile, activation):
    (x, down, up, indices, gates), _ = make_inputs(T, H, K, d, N)
    y, h = tiled.expert_mix_tiled_forward(x.detach(), down.detach(), up.detach(), indices, gates.detach(),
                                          activation, tile_tokens=tile)  # fmt: skip
    assert y.dtype == x.dtype and y.shape == x.shape and h.shape == indices.shape and h.dtype == torch.float32
    assert rel_err(h, _h_float64(x, down, indices)) < 1e-6
    assert rel_err(y, naive_float64(x, down, up, indices, gates, activation)) < 1e-5


@pytest.mark.parametrize("T,H,K,d,N,tile,activation", GRAD_CASES)
def test_gradients_fp32_match_float64(tiled_forward, T, H, K, d, N, tile, activation):
    tiled_forward(tile)
    inputs, dy = make_inputs(T, H, K, d, N, seed=1)
    check_against_float64(inputs, dy, activation, tol=1e-5)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32])
def test_bf16_activations_bf16_or_fp32_tables(tiled_forward, table_dtype):
    tiled_forward(4)
    inputs, dy = make_inputs(19, 2, 5, 32, 29, dtype=torch.bfloat16, table_dtype=table_dtype, seed=2)
    check_against_float64(inputs, dy, "gelu", tol=2e-2)


def test_skewed_routing(dedup, tiled_forward):
    """90% of the selections on 2 hot experts (as the benchmarks' 90%-on-64 at scale): long runs
    of one expert inside each tile, spread over several programs. (N = 64: the backward's expert
    pass costs one interpreted program per expert.)"""
    tiled_forward(6)
    inputs, dy = make_inputs(29, 2, 6, 24, 64, seed=3)
    indices = inputs[3]
    gen = torch.Generator().manual_seed(3)
    hot = torch.rand(indices.shape, generator=gen) < 0.9
    indices.copy_(torch.where(hot.to(DEVICE), indices % 2, indices))
    check_against_float64(inputs, dy, "gelu", tol=1e-5)


def test_repeated_experts_within_a_token(dedup, tiled_forward):
    tiled_forward(3)
    inputs, dy = make_inputs(9, 2, 4, 24, 5, seed=4)
    indices = inputs[3]
    indices[:, :, 1] = indices[:, :, 0]  # same expert twice in one head
    indices[:, 1, :] = indices[:, 0, :]  # and in both heads
    indices[3] = 4  # one token picks expert 4 for all 8 selections
    check_against_float64(inputs, dy, "gelu", tol=1e-5)


def test_small_blocks_many_loop_iterations(dedup, tiled_forward, monkeypatch):
    """2-row blocks: pass A's last program is ragged (T*S odd), pass B loops over S = 15 in 8 blocks."""
    tiled_forward(4)
    tile2 = {"tile": 128, "num_warps": {1024: 4}}  # BLOCK_D = 64 -> 2 rows, 1 warp
    monkeypatch.setattr(tiled, "TILED_TUNING", {"h": tile2, "y": tile2, "tile_tokens": 4, "dedup": dedup})
    assert tiled._config("h", 48, 15) == (64, 2, 1)
    inputs, dy = make_inputs(13, 3, 5, 48, 7, seed=5)
    check_against_float64(inputs, dy, "relu", tol=1e-5)


def test_matches_token_centric_forward(dedup):
    """Same y and h as the default kernels up to fp32 summation order."""
    (x, down, up, indices, gates), _ = make_inputs(17, 2, 4, 32, 40, seed=6)
    args = [t.detach() if t.is_floating_point() else t for t in (x, down, up, indices, gates)]
    y0, h0 = mixing._forward_impl(*args, "gelu")
    y1, h1 = tiled.expert_mix_tiled_forward(*args, "gelu", tile_tokens=5)
    torch.testing.assert_close(h1, h0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)


def test_sort_order_is_tile_then_expert_then_token():
    (_, _, _, indices, _), _ = make_inputs(11, 2, 3, 8, 6, seed=7)
    keys, perm = tiled.sort_by_tile_and_expert(indices, 6, tile_tokens=4)
    assert keys.dtype == torch.int32 and perm.shape == (11 * 6,)
    tok, flat = perm // 6, indices.reshape(-1)[perm]
    torch.testing.assert_close(keys.long(), (tok // 4) * 6 + flat, rtol=0, atol=0)
    order = (tok // 4) * 6 * 11 + flat * 11 + tok  # (tile, expert, token), lexicographic
    assert (order[1:] > order[:-1]).sum() + (order[1:] == order[:-1]).sum() == order.numel() - 1
    assert torch.equal(perm.sort().values, torch.arange(66, device=perm.device))


def test_every_output_element_is_written(dedup, monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tiled, "_new_buffer", poisoned)
    (x, down, up, indices, gates), _ = make_inputs(10, 2, 3, 20, 64, seed=8)
    y, h = tiled.expert_mix_tiled_forward(x.detach(), down.detach(), up.detach(), indices, gates.detach(),
                                          tile_tokens=3)  # fmt: skip
    assert torch.isfinite(y).all() and torch.isfinite(h).all()


def test_empty_batch_and_deterministic(tiled_forward):
    tiled_forward(4)
    (x, down, up, indices, gates), _ = make_inputs(0, 2, 3, 16, 8)
    y = mixing.expert_mix_triton(x, down, up, indices, gates)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert (down.grad == 0).all()
    (x, down, up, indices, gates), _ = make_inputs(12, 2, 3, 16, 6, seed=9)
    args = [t.detach() if t.is_floating_point() else t for t in (x, down, up, indices, gates)]
    first = tiled.expert_mix_tiled_forward(*args, tile_tokens=5)
    second = tiled.expert_mix_tiled_forward(*args, tile_tokens=5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_dedup_runs_inside_a_block(monkeypatch):
    """Runs of one expert that start mid-block, span block edges and fill a whole block (16-row
    blocks, N = 3 experts, one tile): DEDUP gives the same h as loading every row."""
    monkeypatch.setitem(tiled.TILED_TUNING, "h", {"tile": 16 * 32, "num_warps": {1024: 4}})
    (x, down, up, indices, gates), _ = make_inputs(11, 2, 3, 32, 3, seed=10)
    args = [t.detach() if t.is_floating_point() else t for t in (x, down, up, indices, gates)]
    out = {}
    for flag in (False, True):
        monkeypatch.setitem(tiled.TILED_TUNING, "dedup", flag)
        out[flag] = tiled.expert_mix_tiled_forward(*args, tile_tokens=64)
    assert tiled._config("h", 32, 66) == (32, 16, 1)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=0, atol=0)
    assert rel_err(out[True][1], _h_float64(x, down, indices)) < 1e-6


def test_no_selections_per_token(tiled_forward):
    """K = 0: every token selects nothing; y is zero and the gradients are zeros (x) / empty (gates)."""
    tiled_forward(4)
    (x, down, up, indices, gates), _ = make_inputs(6, 2, 0, 16, 8)
    y = mixing.expert_mix_triton(x, down, up, indices, gates)
    assert y.shape == (6, 16) and (y == 0).all()
    y.sum().backward()
    assert (x.grad == 0).all() and (down.grad == 0).all() and gates.grad.shape == (6, 2, 0)


@pytest.mark.parametrize("T,tile", [(11, 4), (300, 1)])  # 300 one-token tiles: int32 tile keys
def test_tile_partition_of_the_expert_sort_gives_the_same_order(T, tile):
    (x, down, up, indices, gates), _ = make_inputs(T, 2, 3, 8, 6, seed=11)
    keys, perm = tiled.sort_by_tile_and_expert(indices, 6, tile_tokens=tile)
    perm_e, _ = mixing._sort_by_expert(indices, 6)
    experts, perm_t = tiled.tile_partition(indices.reshape(-1)[perm_e], perm_e, 6, tile)
    assert torch.equal(perm_t, perm)
    torch.testing.assert_close(experts.long(), keys.long() % 6, rtol=0, atol=0)
    h = torch.empty(indices.shape, dtype=torch.float32, device=x.device)
    tiled.launch_h(x.detach(), down.detach(), experts, perm_t, h)  # expert ids as keys: key % N = id
    torch.testing.assert_close(h, mixing._forward_impl(x.detach(), down.detach(), up.detach(), indices,
                                                        gates.detach(), "gelu")[1], rtol=1e-6, atol=1e-6)  # fmt: skip
