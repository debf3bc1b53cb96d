"""The specs of the column-sliced mixing phases (triton_cols_op.py), in plain PyTorch.

One rank holds columns `cols` (c of them) of both tables; a, dyc, xc are (T, c) activations of those
columns; indices, gates, h, s are (T, H, K). Summed over the ranks' column slices, the partial dots
give the full ones, and the phases give expert_mix's forward and gradients (tested in
tests/ops/test_mixing_columns.py). Computed in float64 if any input is, else float32; they gather
(T, H, K, c) rows: tests and small sizes only.
"""

from __future__ import annotations

import torch

from .reference import activation_fn
from .torch_impl import activation_grad


def _cdt(*ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def column_dots_reference(a, table, indices) -> torch.Tensor:
    """(T, H, K): a[t] . table[indices[t, h, k]] over the c columns held here."""
    cdt = _cdt(a, table)
    return torch.einsum("tc,thkc->thk", a.to(cdt), table[indices].to(cdt))


def column_rows_reference(h, gates, table, indices, activation) -> torch.Tensor:
    """(T, c): sum_hk gates * act(h) * table[indices], h the full dots."""
    cdt = _cdt(h, gates, table)
    w = gates.to(cdt) * activation_fn(activation)(h.to(cdt))
    return torch.einsum("thk,thkc->tc", w, table[indices].to(cdt))


def _index_rows(values, indices, n_experts):
    """(N, c): sum of values[t, h, k] (rows (T, H, K, c)) over the selections of each expert."""
    out = values.new_zeros(n_experts, values.shape[-1])
    return out.index_add_(0, indices.reshape(-1), values.reshape(-1, values.shape[-1]))


def column_up_pass_reference(dyc, up, indices, gates, h, activation, scale=1.0):
    """-> (partial dots dy[t, cols] . v_i (T, H, K), dv (N, c) = scale * sum g act(h) dy[t, cols])."""
    cdt = _cdt(dyc, up, gates, h)
    dy = dyc.to(cdt)
    w = gates.to(cdt) * activation_fn(activation)(h.to(cdt))
    rows = w[..., None] * dy[:, None, None, :]
    return column_dots_reference(dy, up, indices), scale * _index_rows(rows, indices, up.shape[0])


def column_token_pass_reference(s, gates, h, down, indices, activation, gate_scale=1.0):
    """-> coef = g act'(h) s, dgate = gate_scale act(h) s (T, H, K), dx = sum_hk coef down[indices] (T, c)."""
    cdt = _cdt(s, gates, h, down)
    s, g, h = s.to(cdt), gates.to(cdt), h.to(cdt)
    coef = g * activation_grad(activation, h) * s
    dx = torch.einsum("thk,thkc->tc", coef, down[indices].to(cdt))
    return coef, gate_scale * activation_fn(activation)(h) * s, dx


def column_down_pass_reference(xc, coef, indices, n_experts, scale=1.0) -> torch.Tensor:
    """du (N, c) = scale * sum over each expert's selections of coef * x[t, cols]."""
    cdt = _cdt(xc, coef)
    rows = coef.to(cdt)[..., None] * xc.to(cdt)[:, None, None, :]
    return scale * _index_rows(rows, indices, n_experts)
