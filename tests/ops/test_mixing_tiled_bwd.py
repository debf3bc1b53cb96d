"""Tests of the tile-sorted expert pass of the mixing backward (torchpeer/ops/expert_mixing/
triton_tiled_bwd.py), selected by TUNING["expert"]["tile_tokens"], against float64; CPU interpreter
without a GPU, tiny sizes, tiles of 1-8 tokens so that experts first appear in later tiles, appear
in several tiles (read-modify-write of their rows) or in none (zero rows)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import pytest  # noqa: E402

pytest.importorskip("triton")

from tests.ops.test_mixing_triton import DEVICE, check_against_float64, make_inputs  # noqa: E402
from torchpeer.ops.expert_mixing import triton_op as mixing  # noqa: E402
from torchpeer.ops.expert_mixing import triton_tiled_bwd as tiled_bwd  # noqa: E402


@pytest.fixture
def tiled_backward(monkeypatch):
    """Select the tiled expert pass with `tile` tokens per tile; returns a list that counts its launches."""
    calls = []

    def spy(*args):
        calls.append(1)
        return tiled_bwd.launch_expert_tiled(*args)

    monkeypatch.setattr(mixing, "launch_expert_tiled", spy)

    def use(tile, segment=mixing.SEGMENT):
        monkeypatch.setitem(mixing.TUNING, "expert", dict(mixing.TUNING["expert"], tile_tokens=tile, segment=segment))
        return calls

    return use


# (T, H, K, d, N, tile, activation): ragged last tile; one token per tile; one tile larger than T;
# N > T*S (most experts in no tile: zero rows; N = 96 over T*S = 39, each program walking 3 tiles,
# at a fraction of the interpreter time of N = 300 over 5); N < S (each expert in every tile: updates)
CASES = [
    (37, 2, 3, 48, 64, 8, "gelu"),
    (13, 1, 5, 64, 7, 1, "relu"),
    (7, 4, 12, 40, 64, 16, "gelu"),
    (13, 3, 1, 17, 96, 5, "relu"),
]


@pytest.mark.parametrize("T,H,K,d,N,tile,activation", CASES)
def test_gradients_fp32_match_float64(tiled_backward, T, H, K, d, N, tile, activation):
    calls = tiled_backward(tile)
    inputs, dy = make_inputs(T, H, K, d, N, seed=1)
    check_against_float64(inputs, dy, activation, tol=1e-5)
    assert calls == [1]


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32])
def test_bf16_activations_bf16_or_fp32_tables(tiled_backward, table_dtype):
    """bf16 tables: a row is rounded once per tile it appears in (4-5 tiles here): still ~bf16 error."""
    calls = tiled_backward(4)
    inputs, dy = make_inputs(19, 2, 5, 32, 29, dtype=torch.bfloat16, table_dtype=table_dtype, seed=2)
    check_against_float64(inputs, dy, "gelu", tol=2e-2)
    assert calls == [1]


def test_repeated_experts_within_a_token(tiled_backward):
    calls = tiled_backward(3)
    inputs, dy = make_inputs(9, 2, 4, 24, 5, seed=3)
    indices = inputs[3]
    indices[:, :, 1] = indices[:, :, 0]
    indices[:, 1, :] = indices[:, 0, :]
    indices[3] = 4  # one token picks expert 4 for all 8 selections
    check_against_float64(inputs, dy, "gelu", tol=1e-5)
    assert calls == [1]


def test_several_rows_per_step(tiled_backward, monkeypatch):
    """4-row blocks with ragged ends inside each (tile, expert) list."""
    calls = tiled_backward(6)
    monkeypatch.setitem(tiled_bwd.TILED_BWD_TUNING, "tile", 256)  # BLOCK_D = 64 -> 4 rows
    inputs, dy = make_inputs(17, 3, 5, 48, 6, seed=4)
    check_against_float64(inputs, dy, "relu", tol=1e-5)
    assert calls == [1]


def test_skew_falls_back_to_the_default_pass(tiled_backward):
    """90% of the selections on 2 experts: some (tile, expert) list exceeds the segment, so the
    default (skew-robust) pass runs; the gradients are right either way."""
    calls = tiled_backward(6, segment=8)
    inputs, dy = make_inputs(29, 2, 6, 24, 64, seed=5)
    indices = inputs[3]
    hot = torch.rand(indices.shape, generator=torch.Generator().manual_seed(5)) < 0.9
    indices.copy_(torch.where(hot.to(DEVICE), indices % 2, indices))
    check_against_float64(inputs, dy, "gelu", tol=1e-5)
    assert calls == []


def test_every_row_is_written(tiled_backward, monkeypatch):
    """Poisoned buffers: experts in no tile get zero rows, experts that first appear in a later tile
    get their row written there (not read-modified from the poison)."""
    calls = tiled_backward(2)

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mixing, "_new_buffer", poisoned)
    (x, down, up, indices, gates), dy = make_inputs(8, 2, 3, 20, 24, seed=6)
    indices.remainder_(16)
    indices[:4].clamp_(max=7)  # experts 8..15 first appear in tile 2 or later
    mixing.expert_mix_triton(x, down, up, indices, gates).backward(dy)
    for t in (x.grad, down.grad, up.grad, gates.grad):
        assert torch.isfinite(t).all()
    assert (down.grad[16:] == 0).all() and (up.grad[16:] == 0).all()
    assert calls == [1]


def test_plan_first_tile_and_offsets():
    (_, _, _, indices, _), _ = make_inputs(10, 1, 2, 8, 5, seed=7)
    indices.copy_(torch.tensor([[[0, 1]], [[0, 1]], [[2, 2]], [[0, 3]], [[3, 3]]] * 2, device=indices.device))
    perm, offsets, first_tile, n_tiles = tiled_bwd.tile_plan(indices, 5, tile_tokens=3)
    assert n_tiles == 4 and offsets.shape == (4 * 5 + 1,)
    # tokens 0-2 | 3-5 | 6-8 | 9: expert 2 first in tile 0 (token 2), expert 4 nowhere (tile 0)
    assert first_tile.tolist() == [0, 0, 0, 1, 0]
    counts = (offsets[1:] - offsets[:-1]).view(4, 5)
    assert counts.sum().item() == 20 and counts[:, 4].sum().item() == 0


def test_deterministic(tiled_backward):
    tiled_backward(4)
    grads = []
    for _ in range(2):
        (x, down, up, indices, gates), dy = make_inputs(12, 2, 3, 16, 6, seed=8)
        mixing.expert_mix_triton(x, down, up, indices, gates).backward(dy)
        grads.append([t.grad.clone() for t in (x, down, up, gates)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
