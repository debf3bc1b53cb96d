"""Row-sparse AdamW: update only the expert-table rows a step touched.

A PEER step retrieves T * heads * top_k experts out of N = 1024**2, so for small batches most
rows of the ``down``/``up`` tables get a zero gradient. Dense AdamW still reads and writes every
row of the parameter and both moments (5 table-sized passes); this optimizer touches only the
rows given for the step:

    opt = SparseRowAdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    _, indices = peer.retrieve(x)                     # before the forward (the ema norm's statistics
                                                      # move in it), or keep the forward's indices
    rows = indices.unique()
    opt.step(rows={peer.down: rows, peer.up: rows})   # other parameters: plain dense AdamW

Rows can also come from a sparse COO gradient (``nn.Embedding(sparse=True)``): its coalesced
row indices are used, duplicates summed.

Semantics ("lazy" AdamW, as TF's LazyAdam and torch.optim.SparseAdam): a touched row gets exactly
the AdamW update (decoupled weight decay, bias correction with the parameter's global step
count); an untouched row and its moments do not change at all (dense AdamW would still decay
them and move the row along its old momentum). When every row is touched each step the two
are identical. Moments are kept in the parameter's dtype (as torch.optim.AdamW does); the
update is computed in fp32 (fp64 for fp64 parameters).
"""

from __future__ import annotations

import math

import torch

__all__ = ["SparseRowAdamW"]

# Rows per dense-update chunk are chosen so fp32 temporaries stay near this many elements.
_CHUNK_ELEMS = 1 << 24


def _compute_dtype(p: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision parameters, else the parameter's own dtype (fp64 stays fp64)."""
    return torch.promote_types(p.dtype, torch.float32)


def _adamw_(w, m, v, g, lr, b1, b2, eps, wd, step):
    """In-place AdamW on fp32 tensors w (param), m, v (moments) with gradient g."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    w.mul_(1 - lr * wd)
    denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(eps)
    w.addcdiv_(m, denom, value=-lr / (1 - b1**step))


class SparseRowAdamW(torch.optim.Optimizer):
    """AdamW that updates only given rows of selected parameters; dense AdamW for the rest.

    Args: as torch.optim.AdamW (lr, betas, eps, weight_decay); no amsgrad/maximize.
    step(rows): rows maps a parameter to a 1-D int64 tensor of its row indices (dim 0) to update
    this step (duplicates allowed). Parameters with a sparse gradient use its row indices.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _check_rows(self, rows: dict) -> None:
        known = {id(p) for g in self.param_groups for p in g["params"]}
        for p, r in rows.items():
            if id(p) not in known:
                raise ValueError("rows has a tensor that is not a parameter of this optimizer")
            if not isinstance(r, torch.Tensor) or r.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"rows values must be int32/int64 tensors, got {getattr(r, 'dtype', type(r))}")
            if r.dim() != 1:
                raise ValueError(f"rows values must be 1-D row indices, got shape {tuple(r.shape)}; use .flatten()")
            if p.dim() < 1:
                raise ValueError("row updates need parameters with at least one dimension")
            # checked on the CPU only: on a GPU it would cost a host sync every step
            if r.device.type == "cpu" and r.numel() and (int(r.min()) < 0 or int(r.max()) >= p.shape[0]):
                raise ValueError(f"row indices must lie in [0, {p.shape[0]}), got [{int(r.min())}, {int(r.max())}]")

    @torch.no_grad()
    def step(self, rows: dict | None = None, closure=None):
        """One update. rows: {parameter: 1-D int tensor of its touched rows}."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rows = rows or {}
        self._check_rows(rows)
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                args = (lr, b1, b2, eps, wd, state["step"])
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    self._rows_update(p, state, grad.indices()[0], grad.values(), args)
                elif p in rows:
                    idx = rows[p].to(device=p.device, dtype=torch.int64).unique()
                    self._rows_update(p, state, idx, grad.index_select(0, idx), args)
                else:
                    self._dense_update(p, state, grad, args)
        return loss

    @staticmethod
    def _rows_update(p, state, idx, g_rows, args):
        """Gather the rows, update them in fp32, scatter them back."""
        if idx.numel() == 0:
            return
        m, v = state["exp_avg"], state["exp_avg_sq"]
        dt = _compute_dtype(p)
        w_r, m_r, v_r = (t.index_select(0, idx).to(dt) for t in (p, m, v))
        _adamw_(w_r, m_r, v_r, g_rows.to(dt), *args)
        p.index_copy_(0, idx, w_r.to(p.dtype))
        m.index_copy_(0, idx, m_r.to(m.dtype))
        v.index_copy_(0, idx, v_r.to(v.dtype))

    @staticmethod
    def _dense_update(p, state, grad, args):
        """Dense AdamW, in row chunks so the fp32 temporaries stay bounded for huge tables."""
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if not all(t.is_contiguous() for t in (p, m, v, grad)) or p.dim() == 0:
            flat = [t[None] for t in (p, m, v, grad)]  # one chunk; t[None] is a view
        else:
            flat = [t.view(p.shape[0], -1) for t in (p, m, v, grad)]
        per_row = max(1, flat[0][0].numel())
        chunk = max(1, _CHUNK_ELEMS // per_row)
        for r0 in range(0, flat[0].shape[0], chunk):
            w_c, m_c, v_c, g_c = (t[r0 : r0 + chunk] for t in flat)
            dt = _compute_dtype(p)
            w, mf, vf = w_c.to(dt), m_c.to(dt), v_c.to(dt)
            _adamw_(w, mf, vf, g_c.to(dt), *args)
            w_c.copy_(w)
            m_c.copy_(mf)
            v_c.copy_(vf)
