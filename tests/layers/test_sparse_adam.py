"""SparseRowAdamW: equals AdamW on touched rows, leaves untouched rows alone."""

import pytest
import torch
from torch import nn

from torchpeer.optim import sparse_adam
from torchpeer.optim.sparse_adam import SparseRowAdamW

HP = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def _randn(*shape, seed=100, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _grads(shape, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(steps)]


def _lazy_adamw_reference(w0, grads, rows_per_step, lr, betas, eps, weight_decay):
    """float64 loop: AdamW applied row by row, only to the rows of each step."""
    w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    b1, b2 = betas
    for step, (g, rows) in enumerate(zip(grads, rows_per_step), start=1):
        for r in sorted(set(rows)):
            m[r] = b1 * m[r] + (1 - b1) * g[r]
            v[r] = b2 * v[r] + (1 - b2) * g[r] ** 2
            w[r] = w[r] * (1 - lr * weight_decay)
            w[r] -= lr / (1 - b1**step) * m[r] / ((v[r] / (1 - b2**step)).sqrt() + eps)
    return w, m, v


def test_all_rows_touched_equals_torch_adamw():
    w = nn.Parameter(_randn(6, 4))
    w_ref = nn.Parameter(w.detach().clone())
    opt, ref = SparseRowAdamW([w], **HP), torch.optim.AdamW([w_ref], **HP)
    for g in _grads((6, 4), 4):
        w.grad, w_ref.grad = g.clone(), g.clone()
        opt.step(rows={w: torch.arange(6)})
        ref.step()
    torch.testing.assert_close(w.detach(), w_ref.detach())
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], ref.state[w_ref]["exp_avg_sq"])


def test_parameters_without_rows_get_dense_adamw(monkeypatch):
    monkeypatch.setattr(sparse_adam, "_CHUNK_ELEMS", 8)  # several row chunks of 2 rows
    w = nn.Parameter(_randn(5, 4))
    b = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))  # 0-d parameter
    w_ref, b_ref = (nn.Parameter(t.detach().clone()) for t in (w, b))
    opt, ref = SparseRowAdamW([w, b], **HP), torch.optim.AdamW([w_ref, b_ref], **HP)
    for g in _grads((5, 4), 3, seed=1):
        w.grad, w_ref.grad = g.clone(), g.clone()
        b.grad, b_ref.grad = g[0, :1].sum().clone(), g[0, :1].sum().clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(w.detach(), w_ref.detach())
    torch.testing.assert_close(b.detach(), b_ref.detach())


def test_only_given_rows_change_and_match_lazy_adamw():
    w0 = _randn(8, 3)
    w = nn.Parameter(w0.clone())
    opt = SparseRowAdamW([w], **HP)
    steps = [[1, 5, 5, 2], [5, 7], [0, 1]]  # duplicates are updated once
    grads = _grads((8, 3), len(steps), seed=2)
    for g, rows in zip(grads, steps):
        w.grad = g.clone()
        opt.step(rows={w: torch.tensor(rows)})
    ref_w, ref_m, ref_v = _lazy_adamw_reference(w0, grads, steps, **HP)
    torch.testing.assert_close(w.detach(), ref_w)
    torch.testing.assert_close(opt.state[w]["exp_avg"], ref_m)
    torch.testing.assert_close(opt.state[w]["exp_avg_sq"], ref_v)
    for untouched in (3, 4, 6):
        assert torch.equal(w.detach()[untouched], w0[untouched])
        assert not opt.state[w]["exp_avg"][untouched].any()


def test_sparse_embedding_gradient():
    emb = nn.Embedding(10, 4, sparse=True).double()
    emb.weight.data.copy_(_randn(10, 4))
    w0 = emb.weight.detach().clone()
    opt = SparseRowAdamW(emb.parameters(), **HP)
    ids = torch.tensor([[3, 3, 7], [1, 7, 7]])
    g = torch.Generator().manual_seed(3)
    up = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    (emb(ids) * up).sum().backward()
    assert emb.weight.grad.is_sparse
    dense_grad = emb.weight.grad.to_dense()
    opt.step()
    ref_w, _, _ = _lazy_adamw_reference(w0, [dense_grad], [[1, 3, 7]], **HP)
    torch.testing.assert_close(emb.weight.detach(), ref_w)


def test_bf16_rows_close_to_fp32():
    w0 = _randn(16, 8, dtype=torch.float32)
    w16, w32 = nn.Parameter(w0.bfloat16()), nn.Parameter(w0.bfloat16().float())
    o16, o32 = SparseRowAdamW([w16], **HP), SparseRowAdamW([w32], **HP)
    rows = torch.tensor([0, 3, 9])
    for g in _grads((16, 8), 2, seed=4):
        w16.grad, w32.grad = g.bfloat16(), g.bfloat16().float()
        o16.step(rows={w16: rows})
        o32.step(rows={w32: rows})
    assert w16.dtype == o16.state[w16]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(w16.detach().float(), w32.detach(), rtol=2e-2, atol=2e-2)


def test_bad_arguments():
    w = nn.Parameter(_randn(4, 2))
    w.grad = _randn(4, 2, seed=5)
    opt = SparseRowAdamW([w])
    with pytest.raises(ValueError, match="not a parameter of this optimizer"):
        opt.step(rows={torch.zeros(4, 2): torch.tensor([0])})
    with pytest.raises(TypeError, match="int32/int64"):
        opt.step(rows={w: torch.tensor([0.0])})
    with pytest.raises(ValueError, match="1-D row indices"):
        opt.step(rows={w: torch.tensor([[0]])})
    with pytest.raises(ValueError, match=r"row indices must lie in \[0, 4\)"):
        opt.step(rows={w: torch.tensor([4])})
    with pytest.raises(ValueError, match="lr must be"):
        SparseRowAdamW([w], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        SparseRowAdamW([w], betas=(0.9, 1.0))
