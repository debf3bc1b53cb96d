"""The retrieval and mixing autograd Functions call their implementations directly in plain eager
mode (no torch.library dispatch: host time, issue 19) and their custom ops everywhere else
(torch.compile, fake tensors, TorchDispatchMode). Both paths give the same outputs and gradients,
bit for bit; under a dispatch mode the custom ops are what is seen.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from tests.ops.op_recorder import OpRecorder  # noqa: E402
from torchpeer.ops import RetrievalKernelConfig  # noqa: E402
from torchpeer.ops.expert_mixing import triton_op as mixing  # noqa: E402
from torchpeer.ops.retrieval import triton_op as retrieval  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _run(fn, leaves, *rest, mode=None):
    """-> (outputs, grads of the leaves that require grad, the mode's op counts or None)."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    with mode if mode is not None else torch.enable_grad():
        out = fn(*leaves, *rest)
        first = out[0] if isinstance(out, tuple) else out
        up = torch.linspace(-1, 1, first.numel(), device=first.device).view(first.shape)
        (first * up).sum().backward()
    outs = out if isinstance(out, tuple) else (out,)
    grads = [t.grad if t.requires_grad else None for t in leaves]
    return outs, grads, (mode.ops if mode is not None else None)


def _assert_identical(a, b):
    (outs_a, grads_a, _), (outs_b, grads_b, _) = a, b
    assert len(outs_a) == len(outs_b)
    for x, y in zip(outs_a, outs_b):
        assert x.dtype == y.dtype and x.requires_grad == y.requires_grad
        assert torch.equal(x, y)
    for x, y in zip(grads_a, grads_b):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype
            assert torch.equal(x, y)


def _topk_inputs(dtype=torch.float32, T=9, H=2, n=8, d_key=8, need_q=True, need_k=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(T, H, d_key, generator=g).to(DEVICE, dtype).requires_grad_(need_q)
    keys = torch.randn(1, 2, n, d_key // 2, generator=g).to(DEVICE, dtype).requires_grad_(need_k)
    return [q, keys]


# Each forward once and each (q, keys) gradient need once: the forward is picked in the forward op, the
# needs only steer the backward (the same "sorted" backward after any forward), so the 3 x 3 grid
# proved nothing more than its diagonal
@pytest.mark.parametrize(
    "forward,need", [("split", (True, True)), ("threshold", (True, False)), ("merge", (False, True))]
)
def test_retrieval_eager_path_equals_custom_op_path(forward, need):
    leaves = _topk_inputs(need_q=need[0], need_k=need[1])
    config = RetrievalKernelConfig(forward=forward)
    eager = _run(retrieval.product_key_topk_triton, leaves, 4, config)
    ops = _run(retrieval.product_key_topk_triton, leaves, 4, config, mode=OpRecorder())
    _assert_identical(eager, ops)
    assert ops[0][1].dtype == torch.int64 and not ops[0][1].requires_grad  # indices: not differentiable
    seen = ops[2]
    assert seen["torchpeer.product_key_topk_fwd"] == 1 and seen["torchpeer.product_key_topk_bwd"] == 1


def test_retrieval_bf16():
    leaves = _topk_inputs(torch.bfloat16)
    eager = _run(retrieval.product_key_topk_triton, leaves, 4)
    _assert_identical(eager, _run(retrieval.product_key_topk_triton, leaves, 4, mode=OpRecorder()))
    assert eager[1][0].dtype == eager[1][1].dtype == torch.bfloat16


def _mix_inputs(dtype=torch.float32, table_dtype=None, T=7, H=2, K=3, d=16, N=12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, d, generator=g).to(DEVICE, dtype).requires_grad_()
    down = (torch.randn(N, d, generator=g) / 2).to(DEVICE, table_dtype or dtype).requires_grad_()
    up = torch.randn(N, d, generator=g).to(DEVICE, table_dtype or dtype).requires_grad_()
    gates = (torch.rand(T, H, K, generator=g) + 0.1).to(DEVICE).requires_grad_()
    indices = torch.randint(0, N, (T, H, K), generator=g).to(DEVICE)
    return [x, down, up, gates], indices


def _mix(x, down, up, gates, indices, activation):
    return mixing.expert_mix_triton(x, down, up, indices, gates, activation)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("dtypes", [(torch.float32, None), (torch.bfloat16, torch.float32)])
def test_mixing_eager_path_equals_custom_op_path(activation, dtypes):
    leaves, indices = _mix_inputs(*dtypes)
    eager = _run(_mix, leaves, indices, activation)
    ops = _run(_mix, leaves, indices, activation, mode=OpRecorder())
    _assert_identical(eager, ops)
    for leaf, grad in zip(leaves, eager[1]):
        assert grad.dtype == leaf.dtype
    seen = ops[2]
    assert seen["torchpeer.peer_mix_fwd"] == 1 and seen["torchpeer.peer_mix_bwd"] == 1


def test_mixing_autocast_and_partial_grads():
    leaves, indices = _mix_inputs()
    leaves[1].requires_grad_(False)  # down: no gradient wanted

    def under_autocast(*args):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return _mix(*args)

    eager = _run(under_autocast, leaves, indices, "gelu")
    _assert_identical(eager, _run(under_autocast, leaves, indices, "gelu", mode=OpRecorder()))
    assert eager[0][0].dtype == torch.bfloat16 and eager[1][1] is None


def test_fake_tensors_take_the_custom_ops():
    """On fake tensors the shapes come from the ops' register_fake (no launch, no direct call)."""
    with FakeTensorMode() as fake:
        q = fake.from_tensor(torch.randn(5, 2, 8, device=DEVICE)).requires_grad_()
        keys = fake.from_tensor(torch.randn(1, 2, 8, 4, device=DEVICE)).requires_grad_()
        scores, idx = retrieval.product_key_topk_triton(q, keys, 4)
        scores.sum().backward()
        assert scores.shape == idx.shape == (5, 2, 4) and q.grad.shape == q.shape
        (x, down, up, gates), indices = (
            [fake.from_tensor(t.detach()).requires_grad_() for t in _mix_inputs()[0]],
            fake.from_tensor(_mix_inputs()[1]),
        )
        # the Function itself: the entry point's index range check reads CPU values
        y = mixing.ExpertMixFunction.apply(x, down, up, indices, gates, "gelu")
        y.sum().backward()
        assert y.shape == x.shape and down.grad.shape == down.shape


def test_compiled_calls_equal_eager():
    """torch.compile (aot_eager, fullgraph) traces the Function with the ops opaque inside. The retrieval's
    Function, compiled the same way against eager (indices, scores, gradients), is
    test_retrieval_triton.py's test_torch_compile_fullgraph_matches_eager."""
    leaves, indices = _mix_inputs()
    eager = _run(_mix, leaves, indices, "gelu")
    compiled = _run(torch.compile(_mix, backend="aot_eager", fullgraph=True), leaves, indices, "gelu")
    for a, b in zip(eager[0] + tuple(eager[1]), compiled[0] + tuple(compiled[1])):
        torch.testing.assert_close(a, b)


def test_plain_eager_calls_no_custom_op(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a custom op was called in plain eager mode")

    for module, names in ((retrieval, ("_topk_fwd_op", "_topk_bwd_op")), (mixing, ("_peer_mix_fwd", "_peer_mix_bwd"))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)
    _run(retrieval.product_key_topk_triton, _topk_inputs(), 4)
    leaves, indices = _mix_inputs()
    _run(_mix, leaves, indices, "gelu")
