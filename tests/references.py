"""Test references and helpers shared across the test folders (one module, imported as tests.references).

The library's own specs are torchpeer.ops.product_key_topk_reference and
torchpeer.ops.expert_mix_reference; what is here is what tests need on top of them: a loop formula
of expert mixing written independently of every implementation (so the spec itself is tested),
exact product-key top-k by brute force over the full keys, a relative error, a measure of what
autograd keeps for backward, the import of a benchmark script, and lazy Adam by hand in float64 (the
oracle of torchpeer/optim/rowwise_adam.py's spec and of the fused kernels).
"""

import importlib
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_benchmark(name: str):
    """benchmarks/<name>.py as the module ``benchmarks.<name>`` (the scripts are not part of the
    package): the repository root is on sys.path only while it is imported."""
    sys.path.insert(0, REPO)
    try:
        return importlib.import_module(f"benchmarks.{name}")
    finally:
        sys.path.remove(REPO)


def naive_float64(x, down, up, idx, gates, activation, lin=None):
    """Expert mixing as a loop over (head, k) in float64, independent of the implementations:
    sum g act(x.u) v, or with ``lin`` (the GLU read-out's table w) sum g act(x.u) (x.w) v.

    x: (T, d); down, up, lin: (N, d); idx, gates: (T, H, K); activation "gelu", "relu" or
    "identity" -> (T, d) float64.
    """
    act = {"gelu": torch.nn.functional.gelu, "relu": torch.relu, "identity": lambda h: h}[activation]
    x, down, up, gates = (t.double() for t in (x, down, up, gates))
    out = torch.zeros_like(x)
    for h in range(idx.shape[1]):
        for k in range(idx.shape[2]):
            i = idx[:, h, k]
            c = act((x * down[i]).sum(-1, keepdim=True))
            if lin is not None:
                c = c * (x * lin.double()[i]).sum(-1, keepdim=True)
            out = out + gates[:, h, k, None] * c * up[i]
    return out


def brute_force_topk(q: torch.Tensor, sub_keys: torch.Tensor, top_k: int):
    """Exact top-k over all n*n full keys [C[a]; C'[b]] (built explicitly). q: (T, H, d_key),
    sub_keys: (S, 2, n, m) -> scores, indices (T, H, top_k)."""
    S, _, n, m = sub_keys.shape
    full = torch.cat(
        [sub_keys[:, 0].unsqueeze(2).expand(S, n, n, m), sub_keys[:, 1].unsqueeze(1).expand(S, n, n, m)], -1
    ).reshape(S, n * n, 2 * m)  # row a * n + b
    full = full.expand(q.shape[1], -1, -1) if S == 1 else full
    return torch.einsum("thd,hnd->thn", q, full.to(q.dtype)).topk(top_k, dim=-1)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 on the CPU."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return ((a - ref).norm() / ref.norm()).item()


def saved_bytes(fn, params):
    """Bytes of tensors autograd keeps for backward while fn() runs, excluding the `params` themselves."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in param_ptrs:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def assert_backward_matches(m, ref, x, x_ref, y, y_ref, nonzero_grads=False, rtol=1e-4, atol=1e-5):
    """A layer ``m`` against its float64 twin ``ref`` (same state): outputs, then, for one random
    upstream gradient, the input gradient and every parameter gradient (in ``named_parameters`` order).
    nonzero_grads: also require every parameter of ``m`` to receive a non-zero gradient."""
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=rtol, atol=atol)
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        if nonzero_grads:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad.double(), p_ref.grad, rtol=rtol, atol=atol, msg=name)


class LazyAdam64:
    """Lazy Adam on one table by hand, in float64 and one row at a time (independent of
    torchpeer.optim.rowwise_adam_update_ and of the kernels): a row steps only on the steps that
    select it, with its own step count t_r for the bias corrections, and decoupled weight decay;
    the second moment per element (elementwise) or the mean of g^2 per row. State is kept in
    float64 (the spec and the kernels round theirs to fp32 each step)."""

    def __init__(self, table, elementwise, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1):
        self.w = table.detach().double().cpu().clone()
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w) if elementwise else torch.zeros(self.w.shape[0], 1, dtype=torch.float64)
        self.t = [0] * self.w.shape[0]
        self.elementwise, self.betas, self.eps, self.wd = elementwise, betas, eps, weight_decay

    def step(self, grad, rows, lr):
        """grad: the whole table's gradient (N, d) (each row's summed over all its selections);
        rows: the rows the step selected (repeats allowed: a row steps once)."""
        b1, b2 = self.betas
        for r in sorted({int(i) for i in rows}):
            g = grad[r].detach().double().cpu()
            self.t[r] += 1
            self.m[r] = b1 * self.m[r] + (1 - b1) * g
            self.v[r] = b2 * self.v[r] + (1 - b2) * (g * g if self.elementwise else (g * g).mean())
            m_hat = self.m[r] / (1 - b1 ** self.t[r])
            v_hat = self.v[r] / (1 - b2 ** self.t[r])
            self.w[r] = self.w[r] * (1 - lr * self.wd) - lr * m_hat / (v_hat.sqrt() + self.eps)
