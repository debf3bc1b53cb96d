"""The "sorted" retrieval backward (dq kernel + sub-key gradient by sorted segment sums) against the
float64 reference's autograd, shared and per-head keys, and bitwise deterministic. TRITON_INTERPRET=1."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from torchpeer.ops import RetrievalKernelConfig, product_key_topk_reference  # noqa: E402
from torchpeer.ops.retrieval.triton_backward import backward  # noqa: E402
from torchpeer.ops.retrieval.triton_op import product_key_topk_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SORTED = RetrievalKernelConfig(forward="split", backward="sorted")


def _grads(q, keys, top_k, config, up):
    q, keys = q.detach().requires_grad_(), keys.detach().requires_grad_()
    scores, idx = product_key_topk_triton(q, keys, top_k, config)
    (scores * up).sum().backward()
    return idx, q.grad, keys.grad


def _backward(q, keys, idx, up):
    """The "sorted" backward alone, for given indices (what autograd calls after the forward) -> dq, dk."""
    return backward(up.contiguous(), q, keys, idx, True, True, SORTED)


def _reference(q, keys, top_k, up):
    """-> (indices, dq, dk) of the float64 reference's selection through float64 autograd."""
    q64, k64 = q.double().requires_grad_(), keys.double().requires_grad_()
    ref_s, ref_i = product_key_topk_reference(q64, k64, top_k)
    (ref_s * up.double()).sum().backward()
    return ref_i, q64.grad, k64.grad


@pytest.mark.parametrize(
    "T,H,S,n,d_key,top_k,dtype",
    [(21, 2, 1, 12, 8, 5, torch.float32), (9, 3, 3, 8, 16, 4, torch.float32), (17, 2, 1, 10, 6, 3, torch.bfloat16)],
)
def test_sorted_backward_matches_float64(T, H, S, n, d_key, top_k, dtype):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(T, H, d_key, generator=g).to(DEVICE, dtype)
    keys = torch.randn(S, 2, n, d_key // 2, generator=g).to(DEVICE, dtype)
    up = torch.randn(T, H, top_k, generator=g).to(DEVICE)
    idx, dq, dk = _grads(q, keys, top_k, SORTED, up)
    q64, k64 = q.double().requires_grad_(), keys.double().requires_grad_()
    ref_s, ref_i = product_key_topk_reference(q64, k64, top_k)
    (ref_s * up.double()).sum().backward()
    assert torch.equal(idx.cpu(), ref_i.cpu())
    assert dq.dtype == dtype and dk.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(dq.double(), q64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(dk.double(), k64.grad, rtol=tol, atol=tol)
    assert k64.grad.abs().sum() > 0
    dq2, dk2 = _backward(q, keys, idx, up)  # the backward again, for the same selection
    assert torch.equal(dk2, dk) and torch.equal(dq2, dq)  # no atomics: bitwise the same


def test_int16_and_int32_sort_keys_give_the_same_gradients(monkeypatch):
    """Up to INT16_KEY_ROWS table rows the sort keys are int16 (2 radix passes instead of 4); the
    int32 keys beyond it sort the same pairs in the same stable order, so the gradients are bitwise
    equal (forced here by lowering the limit)."""
    from torchpeer.ops.retrieval import triton_backward_sorted as sb

    g = torch.Generator().manual_seed(3)
    q = torch.randn(13, 2, 8, generator=g).to(DEVICE)
    keys = torch.randn(2, 2, 9, 4, generator=g).to(DEVICE)  # per-head keys: 36 table rows
    up = torch.randn(13, 2, 4, generator=g).to(DEVICE)
    seen = []
    real_sort = torch.sort
    monkeypatch.setattr(sb.torch, "sort", lambda t, **kw: seen.append(t.dtype) or real_sort(t, **kw))
    idx = product_key_topk_reference(q, keys, 4)[1]  # the selection; only the backward runs twice
    dq16, dk16 = _backward(q, keys, idx, up)
    monkeypatch.setattr(sb, "INT16_KEY_ROWS", 35)
    dq32, dk32 = _backward(q, keys, idx, up)
    assert seen == [torch.int16, torch.int32]
    assert torch.equal(dk16, dk32) and torch.equal(dq16, dq32)


def _split_everything(monkeypatch, sb, blocks=1):
    """Segments of `blocks` blocks and a split check that always says yes (the plan is built)."""
    monkeypatch.setattr(sb, "SEGMENT_BLOCKS", blocks)
    monkeypatch.setattr(sb, "_rows_need_split", lambda offsets, seg: True)


def test_segmented_row_lists_give_the_reference_gradients(monkeypatch):
    """Each table row's sorted list cut into segments of 1 and of 2 blocks (extra segments' partials
    added to the row in segment order by the reduce kernel): the sub-key gradient matches float64 and
    is bitwise repeatable; it matches the unsplit walk to fp32 rounding. The backward alone, on the
    float64 reference's selection (the forward kernels are tested elsewhere; here they only cost)."""
    from torchpeer.ops.retrieval import triton_backward_sorted as sb

    g = torch.Generator().manual_seed(11)
    q = torch.randn(40, 2, 8, generator=g).to(DEVICE)
    keys = torch.randn(1, 2, 6, 4, generator=g).to(DEVICE)  # 6 sub-keys: lists of ~53 entries each
    up = torch.randn(40, 2, 4, generator=g).to(DEVICE)
    idx, _, dk_ref = _reference(q, keys, 4, up)
    _, dk_whole = _backward(q, keys, idx, up)
    calls = []
    real = sb.segment_plan
    monkeypatch.setattr(sb, "segment_plan", lambda *a: calls.append(a[2]) or real(*a))
    for blocks in (1, 2):
        _split_everything(monkeypatch, sb, blocks)
        calls.clear()
        _, dk = _backward(q, keys, idx, up)
        assert calls == [sb.sorted_block_s() * blocks]  # the plan was built and used
        torch.testing.assert_close(dk.double(), dk_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dk, dk_whole, rtol=1e-5, atol=1e-6)
        _, dk2 = _backward(q, keys, idx, up)
        assert torch.equal(dk2, dk)


def test_a_hot_sub_key_is_spread_over_segments(monkeypatch):
    """Skewed routing: one sub-key of each half in (nearly) every selection, so one row's list holds
    most entries; with the plan it is walked by many programs and still sums to the reference (the
    backward alone, on the float64 reference's selection)."""
    from torchpeer.ops.retrieval import triton_backward_sorted as sb

    g = torch.Generator().manual_seed(5)
    T, H, n, dh = 64, 2, 8, 4
    keys = torch.randn(1, 2, n, dh, generator=g) * 0.1
    keys[0, :, 3] = 5.0  # sub-key 3 of both halves wins every query's first place
    q = (torch.randn(T, H, 2 * dh, generator=g) * 0.1 + 1.0).to(DEVICE)
    keys = keys.to(DEVICE)
    up = torch.randn(T, H, 3, generator=g).to(DEVICE)
    idx, dq_ref, dk_ref = _reference(q, keys, 3, up)
    _split_everything(monkeypatch, sb)
    plans = []
    real = sb.row_segments
    monkeypatch.setattr(sb, "row_segments", lambda *a: plans.append(real(*a)) or plans[-1])
    dq, dk = _backward(q, keys, idx, up)
    assert (idx // n == 3).float().mean() > 0.6  # the skew is real
    seg, nseg, pbase, seg_row, seg_index, hot = plans[0]
    hot_rows = hot[hot >= 0].tolist()
    assert {3, n + 3} <= set(hot_rows) and int(nseg[3]) >= 4  # both halves' hot rows split up
    torch.testing.assert_close(dk.double(), dk_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq.double(), dq_ref, rtol=1e-5, atol=1e-5)
