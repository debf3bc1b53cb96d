"""Tests of the split-S mixing forward for a few tokens (torchpeer/ops/expert_mixing/triton_decode.py)
vs float64; CPU interpreter without a GPU, tiny sizes. The backward is the unchanged one, fed the h
of the split forward (selected by TUNING["fwd"]["split_below"])."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import pytest  # noqa: E402

pytest.importorskip("triton")

from tests.ops.test_mixing_triton import check_against_float64, make_inputs  # noqa: E402
from tests.references import naive_float64, rel_err  # noqa: E402
from torchpeer.ops.expert_mixing import triton_decode as decode  # noqa: E402
from torchpeer.ops.expert_mixing import triton_op as mixing  # noqa: E402


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 2-4 rows at these widths (the default 8192-element tile would make one block of all
    S selections, so one chunk per token): chunks of several blocks, several chunks per token."""
    monkeypatch.setitem(decode.SPLIT_TUNING, "tile", 128)


@pytest.fixture
def split_forward(monkeypatch):
    """expert_mix_triton's forward through the split kernels for batches of <= 64 tokens."""
    monkeypatch.setitem(mixing.TUNING, "fwd", dict(mixing.TUNING["fwd"], split_below=64))


def _detached(inputs):
    return [t.detach() if t.is_floating_point() else t for t in inputs]


# (T, H, K, d, N, split, activation): one token; S = 15 with chunks of 4 (a ragged last chunk); one
# chunk per token (split >= S); chunks of one selection; d not a power of two
CASES = [
    (1, 8, 16, 64, 500, 16, "gelu"),
    (3, 3, 5, 48, 64, 4, "relu"),
    (5, 2, 3, 17, 11, 32, "gelu"),
    (32, 2, 4, 24, 40, 1, "relu"),
]


@pytest.mark.parametrize("T,H,K,d,N,split,activation", CASES)
def test_forward_y_and_h_match_float64(T, H, K, d, N, split, activation):
    block_s, chunks = decode._plan(d, H * K, split)[1::3]
    assert chunks == -(-H * K // max(split, block_s)) and (chunks > 1 or split >= H * K)
    (x, down, up, indices, gates), _ = make_inputs(T, H, K, d, N)
    y, h = decode.expert_mix_split_forward(*_detached((x, down, up, indices, gates)), activation, split=split)
    assert y.dtype == x.dtype and y.shape == x.shape and h.shape == indices.shape
    h_ref = torch.einsum("td,thkd->thk", x.double(), down.double()[indices])
    assert rel_err(h, h_ref) < 1e-6
    assert rel_err(y, naive_float64(x, down, up, indices, gates, activation)) < 1e-5


@pytest.mark.parametrize("T,H,K,d,N,split,activation", CASES[1:])
def test_gradients_fp32_match_float64(split_forward, monkeypatch, T, H, K, d, N, split, activation):
    monkeypatch.setitem(decode.SPLIT_TUNING, "split", split)
    inputs, dy = make_inputs(T, H, K, d, N, seed=1)
    check_against_float64(inputs, dy, activation, tol=1e-5)


@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float32])
def test_bf16_activations_bf16_or_fp32_tables(split_forward, table_dtype):
    inputs, dy = make_inputs(4, 2, 5, 32, 29, dtype=torch.bfloat16, table_dtype=table_dtype, seed=2)
    check_against_float64(inputs, dy, "gelu", tol=2e-2)


def test_repeated_experts_within_a_token(split_forward):
    inputs, dy = make_inputs(6, 2, 4, 24, 5, seed=3)
    indices = inputs[3]
    indices[:, :, 1] = indices[:, :, 0]
    indices[:, 1, :] = indices[:, 0, :]
    indices[3] = 4  # one token picks expert 4 for all 8 selections
    check_against_float64(inputs, dy, "gelu", tol=1e-5)


def test_batches_above_the_threshold_keep_the_token_centric_kernel(monkeypatch):
    calls = []
    real = decode.expert_mix_split_forward
    monkeypatch.setattr(mixing, "expert_mix_split_forward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setitem(mixing.TUNING, "fwd", dict(mixing.TUNING["fwd"], split_below=4))
    for T in (4, 5):
        (x, down, up, indices, gates), _ = make_inputs(T, 2, 3, 16, 12, seed=4)
        mixing._forward_impl(*_detached((x, down, up, indices, gates)), "gelu")
    assert calls == [1]


def test_matches_token_centric_forward_and_is_deterministic():
    (x, down, up, indices, gates), _ = make_inputs(7, 2, 6, 32, 40, seed=5)
    args = _detached((x, down, up, indices, gates))
    y0, h0 = mixing._forward_impl(*args, "gelu")
    y1, h1 = decode.expert_mix_split_forward(*args, "gelu", split=4)
    torch.testing.assert_close(h1, h0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    y2, h2 = decode.expert_mix_split_forward(*args, "gelu", split=4)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)


def test_every_output_element_is_written(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(decode, "_new_buffer", poisoned)
    (x, down, up, indices, gates), _ = make_inputs(3, 3, 5, 20, 64, seed=6)
    y, h = decode.expert_mix_split_forward(*_detached((x, down, up, indices, gates)), split=4)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()


def test_empty_batch(split_forward):
    (x, down, up, indices, gates), _ = make_inputs(0, 2, 3, 16, 8)
    y = mixing.expert_mix_triton(x, down, up, indices, gates)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert (down.grad == 0).all()
