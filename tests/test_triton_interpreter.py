"""tests/triton_interpreter.py: under TRITON_INTERPRET=1 a float tl.dot is each element's float64 sum of
exact products rounded once, so kernels that tile the same dot differently agree bit for bit on any
host (OpenBLAS's float32 matmul, the interpreter's own dot, rounds by block position and CPU)."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's dot")


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    acc = tl.zeros((BM, BN), dtype=tl.float32) + 0.5
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b, acc, input_precision="ieee"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_dot_is_the_rounded_float64_sum_whatever_the_tile(dtype):
    M, N, K = 64, 64, 32
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(shape, generator=g).to(dtype) for shape in ((M, K), (K, N)))
    want = (a.double() @ b.double()).float() + 0.5  # the sum rounded once, then the accumulator added
    for bm, bn in ((16, 16), (32, 64), (64, 16)):
        c = torch.empty(M, N)
        _dot_kernel[(M // bm, N // bn)](a, b, c, N, K, bm, bn)
        assert torch.equal(c, want), (bm, bn, (c - want).abs().max().item())


def test_an_integer_dot_keeps_tritons_own_code():
    a = torch.randint(-100, 100, (16, 16), dtype=torch.int8)
    b = torch.randint(-100, 100, (16, 16), dtype=torch.int8)
    c = torch.empty(16, 16, dtype=torch.int32)

    @triton.jit
    def int_dot(a_ptr, b_ptr, c_ptr):
        r = tl.arange(0, 16)
        x = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        y = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
        tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(x, y))

    int_dot[(1,)](a, b, c)
    assert torch.equal(c, a.int() @ b.int())
