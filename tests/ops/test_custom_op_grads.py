"""The Triton retrieval and mixing ops' backward: no zero gradient is materialised for their
non-differentiable second outputs (retrieval's indices, mixing's h), i.e. no memset per step
(issue 19: host work and launches at small token counts), and the gradients are unchanged."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from tests.ops.op_recorder import OpRecorder  # noqa: E402
from torchpeer.ops.expert_mixing.triton_op import expert_mix_triton  # noqa: E402
from torchpeer.ops.retrieval.triton_op import product_key_topk_triton  # noqa: E402


def _zero_fills(calls, shape):
    return [c for c in calls if c[1] == shape and c[0] in ("zeros", "zeros_like", "zero_", "fill_", "new_zeros")]


def test_retrieval_backward_materialises_no_index_gradient():
    torch.manual_seed(0)
    T, H, n, dk, K = 8, 2, 16, 8, 4
    q = torch.randn(T, H, dk, dtype=torch.float64).float().requires_grad_()
    keys = torch.randn(1, 2, n, dk // 2).requires_grad_()
    scores, idx = product_key_topk_triton(q, keys, K)
    w = torch.randn_like(scores)
    with OpRecorder() as ops:
        (scores * w).sum().backward()
    assert not _zero_fills(ops.calls, (T, H, K)), ops.calls
    # the gradient is the one of the selected scores: d score(t,h,j) / d q = [k_a ; k_b]
    a, b = idx // n, idx % n
    ka, kb = keys[0, 0].detach()[a], keys[0, 1].detach()[b]  # (T, H, K, dk/2)
    dq = torch.cat([(w[..., None] * ka).sum(2), (w[..., None] * kb).sum(2)], dim=-1)
    torch.testing.assert_close(q.grad, dq, rtol=1e-5, atol=1e-5)


def test_mixing_backward_materialises_no_h_gradient():
    torch.manual_seed(0)
    T, H, K, d, N = 8, 2, 3, 16, 32
    x = torch.randn(T, d, requires_grad=True)
    down = torch.randn(N, d, requires_grad=True)
    up = torch.randn(N, d, requires_grad=True)
    idx = torch.randint(0, N, (T, H, K))
    gates = torch.rand(T, H, K, requires_grad=True)
    y = expert_mix_triton(x, down, up, idx, gates)
    dy = torch.randn_like(y)
    with OpRecorder() as ops:
        y.backward(dy)
    assert not _zero_fills(ops.calls, (T, H, K)), ops.calls
    x64, d64, u64, g64 = (t.detach().double().requires_grad_() for t in (x, down, up, gates))
    h = torch.einsum("td,thkd->thk", x64, d64[idx])
    y64 = torch.einsum("thk,thkd->td", g64 * torch.nn.functional.gelu(h), u64[idx])
    y64.backward(dy.double())
    for got, ref in ((x.grad, x64.grad), (down.grad, d64.grad), (up.grad, u64.grad), (gates.grad, g64.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
