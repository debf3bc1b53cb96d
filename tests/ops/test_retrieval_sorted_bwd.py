"""The "sorted" retrieval backward (dq kernel + sub-key gradient by sorted segment sums) against the
float64 reference's autograd, shared and per-head keys, and bitwise deterministic. TRITON_INTERPRET=1."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from torchpeer.ops import RetrievalKernelConfig, product_key_topk_reference  # noqa: E402
from torchpeer.ops.retrieval.triton_op import product_key_topk_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SORTED = RetrievalKernelConfig(forward="split", backward="sorted")


def _grads(q, keys, top_k, config, up):
    q, keys = q.detach().requires_grad_(), keys.detach().requires_grad_()
    scores, idx = product_key_topk_triton(q, keys, top_k, config)
    (scores * up).sum().backward()
    return idx, q.grad, keys.grad


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
    _, dq2, dk2 = _grads(q, keys, top_k, SORTED, up)
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
    _, dq16, dk16 = _grads(q, keys, 4, SORTED, up)
    monkeypatch.setattr(sb, "INT16_KEY_ROWS", 35)
    _, dq32, dk32 = _grads(q, keys, 4, SORTED, up)
    assert seen == [torch.int16, torch.int32]
    assert torch.equal(dk16, dk32) and torch.equal(dq16, dq32)


def test_segment_splits_follow_the_mean_list_length():
    from torchpeer.ops.retrieval.triton_backward_sorted import segment_splits

    # 65536 tokens x H 8 x k 16, both halves, 2048 table rows, blocks of 64: 128 blocks per row -> 4
    assert segment_splits(2 * 65536 * 8 * 16, 2048, 64) == 4
    assert segment_splits(2 * 4096 * 8 * 16, 2048, 64) == 1  # 8 blocks per row: one program is enough
    assert segment_splits(10**10, 2048, 64) == 8  # capped
    assert segment_splits(0, 2048, 64) == 1


@pytest.mark.parametrize("splits", [2, 3])
def test_split_row_lists_give_the_reference_gradients(monkeypatch, splits):
    """Each table row's sorted list walked by several programs (partial sums added in a fixed order):
    the sub-key gradient still matches float64 and is bitwise repeatable; rows whose list is shorter
    than the splits leave empty slices (zero partials)."""
    from torchpeer.ops.retrieval import triton_backward_sorted as sb

    monkeypatch.setattr(sb, "segment_splits", lambda *a, **kw: splits)
    g = torch.Generator().manual_seed(11)
    q = torch.randn(40, 2, 8, generator=g).to(DEVICE)
    keys = torch.randn(1, 2, 6, 4, generator=g).to(DEVICE)  # 6 sub-keys: long lists (~53 entries each)
    up = torch.randn(40, 2, 4, generator=g).to(DEVICE)
    _, dq, dk = _grads(q, keys, 4, SORTED, up)
    q64, k64 = q.double().requires_grad_(), keys.double().requires_grad_()
    ref_s, _ = product_key_topk_reference(q64, k64, 4)
    (ref_s * up.double()).sum().backward()
    torch.testing.assert_close(dk.double(), k64.grad, rtol=1e-5, atol=1e-5)
    _, _, dk2 = _grads(q, keys, 4, SORTED, up)
    assert torch.equal(dk2, dk)
