"""Expert mixing in PyTorch (the reference and the lean chunked backend): output and gradients vs
the float64 loop formula; the lean backend's memory bound (what it keeps alive for backward)."""

import pytest
import torch

from tests.references import naive_float64, saved_bytes
from torchpeer.ops import expert_mix_reference, expert_mix_torch


def make_inputs(T=23, d=12, N=30, H=3, K=5, dtype=torch.float64, seed=0, repeat=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype, requires_grad=True)
    down = torch.randn(N, d, generator=g, dtype=dtype, requires_grad=True)
    up = torch.randn(N, d, generator=g, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, N, (T, H, K), generator=g)
    if repeat:  # repeated experts within a token and across tokens
        idx[:, :, 1] = idx[:, :, 0]
        idx[::2, 0, :] = 7
    gates = torch.rand(T, H, K, generator=g, dtype=dtype, requires_grad=True)
    return x, down, up, idx, gates


@pytest.mark.parametrize("impl", [expert_mix_reference, expert_mix_torch])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("repeat", [False, True])
def test_mix_forward_backward_float64(impl, activation, repeat):
    x, down, up, idx, gates = make_inputs(repeat=repeat)
    kwargs = {"chunk": 4} if impl is expert_mix_torch else {}
    y = impl(x, down, up, idx, gates, activation, **kwargs)
    ref = naive_float64(x, down, up, idx, gates, activation)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, down, up, gates), dy)
    want = torch.autograd.grad(ref, (x, down, up, gates), dy)
    for a, b in zip(got, want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_lean_mix_low_precision(dtype, tol):
    x, down, up, idx, gates = make_inputs(T=31, d=16, dtype=dtype, seed=3)
    y = expert_mix_torch(x, down, up, idx, gates, "gelu", chunk=8)
    assert y.dtype == dtype
    ref = naive_float64(x, down, up, idx, gates, "gelu")
    assert (y.double() - ref).norm() / ref.norm() < tol
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, down, up, gates), dy)
    want = torch.autograd.grad(ref, (x, down, up, gates), dy.double())
    for a, b in zip(got, want):
        assert a.dtype == dtype
        assert (a.double() - b).norm() / b.norm() < tol


def test_lean_mix_fp32_tables_with_bf16_input():
    """Autocast case: fp32 master tables, bf16 activations; table grads come back in fp32."""
    x, down, up, idx, gates = make_inputs(T=17, d=16, dtype=torch.float32, seed=4)
    xb = x.detach().bfloat16().requires_grad_()
    y = expert_mix_torch(xb, down, up, idx, gates, "gelu")
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert down.grad.dtype == torch.float32 and up.grad.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16


def test_lean_backend_does_not_keep_gathered_rows():
    T, d, N, H, K = 256, 64, 100, 4, 8
    x, down, up, idx, gates = make_inputs(T=T, d=d, N=N, H=H, K=K, dtype=torch.float32)
    gathered = T * H * K * d * 4  # bytes of ONE gathered (T, H, K, d) fp32 tensor
    lean = saved_bytes(lambda: expert_mix_torch(x, down, up, idx, gates, "gelu", chunk=32), (down, up))
    ref = saved_bytes(lambda: expert_mix_reference(x, down, up, idx, gates, "gelu"), (down, up))
    assert ref >= gathered  # the measurement sees materialised rows
    # lean keeps x, indices, gates: O(T*d + T*H*K), independent of d for the (T,H,K) part
    assert lean <= T * d * 4 + T * H * K * (8 + 4)
    assert lean < gathered / 10


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (dict(x=(5,)), ValueError, "tokens, d_model"),
        (dict(down=(30, 11)), ValueError, "n_experts"),
        (dict(idx=(4, 3, 5)), ValueError, "tokens = 23"),
    ],
)
def test_mix_bad_inputs(args, exc, match):
    x, down, up, idx, gates = make_inputs()
    if "x" in args:
        x = torch.randn(args["x"])
    if "down" in args:
        down = torch.randn(args["down"])
    if "idx" in args:
        idx = torch.randint(0, 30, args["idx"])
    with pytest.raises(exc, match=match):
        expert_mix_torch(x, down, up, idx, gates)


def test_mix_float_indices_rejected():
    x, down, up, idx, gates = make_inputs()
    with pytest.raises(TypeError, match="int32 or int64"):
        expert_mix_torch(x, down, up, idx.float(), gates)
