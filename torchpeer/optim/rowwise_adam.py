"""Lazy row-wise Adam for expert tables: the update rule (plain PyTorch spec) and its state.

FBGEMM's table-batched embeddings train huge tables with row-wise optimizers applied inside the
backward, touching only the rows a step used. This is the same idea for PEER's down/up tables
(the fused Triton version is torchpeer/ops/expert_mixing/triton_fused_op.py; this file is the spec
it is tested against, step for step).

Rule, for every row r that the step's routing selected (any token, head or slot picked it), with
its gradient g (d,) and per-row step count t_r:

    t_r  <- t_r + 1
    m_r  <- b1 m_r + (1 - b1) g                        first moment: per element, fp32 (N, d)
    v_r  <- b2 v_r + (1 - b2) mean(g^2)                second moment, row-wise: ONE fp32 scalar per row
    v_r  <- b2 v_r + (1 - b2) g^2                      ... or element-wise: fp32 (N, d), like m
    w_r  <- w_r (1 - lr wd) - lr (m_r / (1 - b1^t_r)) / (sqrt(v_r / (1 - b2^t_r)) + eps)

Which second moment a state keeps is its exp_avg_sq's shape: (N,) row-wise, (N, d) element-wise
(the lazy Adam of TF LazyAdam / torch SparseAdam with per-row step counts, i.e. AdamW's per-element
rule on the rows a step selected). "Row-wise" in the names below means the lazy ROW updates, which
both share.

Rows nobody selected do not change at all, nor does their state ("lazy" semantics, as
TF LazyAdam / torch SparseAdam; a selected row whose gradient happens to be zero still steps).

Why a per-row step count and not the global step: under lazy updates a row's moments only ever
saw that row's own t_r gradients, so t_r is what bias correction must undo; with the global step
a row first touched at step 1000 would take its first step with m = (1 - b1) g uncorrected, i.e.
~(1 - b1) / sqrt(1 - b2) = 3.2x a normal Adam step. With t_r every row's first update is the
normal sign-like Adam step. Costs 4 bytes per row (int32), nothing per element.

Why a row-wise second moment: it removes a table-sized fp32 tensor (4 bytes per parameter of
state and 8 bytes per parameter of traffic per step); within one expert row the gradient is
g * act(h) * dy summed over its tokens, whose elements share one scale, so one scalar per row
should lose little (FBGEMM's rowwise Adagrad/Adam make the same choice). Measured, it does lose:
issue 18's CPU proxy put row-wise v at +0.010 to +0.025 nats over AdamW and lazy per-element v at
AdamW's loss (+0.0009 over four seeds; benchmarks/NOTES_issue19.md section 25), hence the
element-wise choice, at 8 more bytes of traffic per parameter a step.

Clipping: the table gradients are NOT clipped and are excluded from the global gradient norm
(the update runs inside the backward, before any global norm could exist). Adam's normalisation
bounds each row's step by about lr / (1 - b1) whatever the gradient's scale, which is the part of
clipping's protection that matters for rarely-used rows. `row_sq_norm` sums of g^2 are not kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RowwiseAdamState", "RowwiseAdamW", "rowwise_adam_update_"]


@dataclass
class RowwiseAdamState:
    """State of one table (N, d): exp_avg (N, d) fp32 (or bf16), exp_avg_sq (N,) fp32 (row-wise) or
    (N, d) fp32 (element-wise), steps (N,) int32, and optionally master (N, d) fp32: the weights,
    when the table itself is a bf16 working copy (the update runs on the master and rounds it into
    the table)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    steps: torch.Tensor
    master: torch.Tensor | None = None

    @classmethod
    def zeros_like(
        cls,
        table: torch.Tensor,
        master: torch.Tensor | None = None,
        moment_dtype: torch.dtype = torch.float32,
        elementwise: bool = False,
    ) -> RowwiseAdamState:
        """moment_dtype: fp32, or bf16 for the first moment (half its bytes; rounded each step).
        elementwise: the second moment per element (N, d), else per row (N,); fp32 either way."""
        n = table.shape[0]
        dev = table.device
        return cls(
            torch.zeros(table.shape, dtype=moment_dtype, device=dev),
            torch.zeros(table.shape if elementwise else (n,), dtype=torch.float32, device=dev),
            torch.zeros(n, dtype=torch.int32, device=dev),
            master,
        )

    @property
    def elementwise(self) -> bool:
        """True when the second moment is kept per element ((N, d)), False per row ((N,))."""
        return self.exp_avg_sq.dim() == 2

    def _names(self) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "steps") + (("master",) if self.master is not None else ())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._names()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if ("master" in sd) != (self.master is not None):
            raise ValueError("row-wise Adam state: the checkpoint and this run disagree on fp32 master tables")
        if sd["exp_avg_sq"].dim() != self.exp_avg_sq.dim():
            kinds = {1: "per row (row-wise: rowwise_adam*)", 2: "per element (elementwise_adam*)"}
            raise ValueError(
                f"the checkpoint's Adam second moment is {kinds[sd['exp_avg_sq'].dim()]}, this run's is "
                f"{kinds[self.exp_avg_sq.dim()]}: resume with the train.expert_optimizer the checkpoint was "
                "trained with (or start a new run)"
            )
        for name in self._names():
            mine = getattr(self, name)
            theirs = sd[name]
            if theirs.shape != mine.shape:
                raise ValueError(
                    f"row-wise Adam state '{name}' has shape {tuple(theirs.shape)}, expected {tuple(mine.shape)}"
                )
            mine.copy_(theirs)


@torch.no_grad()
def rowwise_adam_update_(
    table: torch.Tensor,
    state: RowwiseAdamState,
    rows: torch.Tensor,
    grad_rows: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """The spec: apply the rule above in place to `table` rows `rows` (unique, int64 (R,)) with
    their gradients grad_rows (R, d); the second moment per row or per element as state keeps it.
    Computed in fp64, stored in the table's/state's dtypes."""
    if rows.dim() != 1 or grad_rows.shape != (rows.numel(), table.shape[1]):
        raise ValueError(
            f"rows (R,) and grad_rows (R, {table.shape[1]}) expected, got {tuple(rows.shape)}, {tuple(grad_rows.shape)}"
        )
    if rows.numel() != rows.unique().numel():
        raise ValueError("rows must be unique (sum the gradients of repeated rows first)")
    b1, b2 = betas
    g = grad_rows.double()
    t = state.steps[rows].double() + 1
    m = b1 * state.exp_avg[rows].double() + (1 - b1) * g
    g2 = g.pow(2) if state.elementwise else g.pow(2).mean(dim=1, keepdim=True)  # (R, d) or (R, 1)
    v = b2 * state.exp_avg_sq[rows].double().view_as(g2) + (1 - b2) * g2
    weights = table if state.master is None else state.master
    w = weights[rows].double() * (1 - lr * weight_decay)
    w = w - lr * (m / (1 - b1**t)[:, None]) / ((v / (1 - b2**t)[:, None]).sqrt() + eps)
    if state.master is not None:
        state.master[rows] = w.float()
    table[rows] = w.to(weights.dtype).to(table.dtype)  # via the master's dtype, as the kernel rounds
    state.exp_avg[rows] = m.float().to(state.exp_avg.dtype)  # via fp32, as the kernel rounds
    state.exp_avg_sq[rows] = v.float().view(-1, *state.exp_avg_sq.shape[1:])
    state.steps[rows] = t.to(torch.int32)


class RowwiseAdamW(torch.optim.Optimizer):
    """Plain-PyTorch optimizer with the row-wise rule for some groups, AdamW for the others
    (elementwise=True: the rule with a per-element second moment, the fused elementwise_adam's).

    For CPU runs and quality experiments (the fused Triton path needs a GPU): param groups as
    torchpeer.lm.optim.param_groups builds them; groups whose "name" is in `rowwise_groups`
    (default the expert tables, "experts") take rowwise_adam_update_ on the rows with a nonzero
    gradient this step (the fused kernel updates every SELECTED row: the two differ only for a
    selected row whose gradient is exactly zero); the other groups take torch.optim.AdamW.
    Sharing the group dicts keeps lr schedules (which set group["lr"]) working for both.
    """

    def __init__(
        self, param_groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, rowwise_groups=("experts",), elementwise=False
    ):
        super().__init__(param_groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0))
        self.rowwise_groups = tuple(rowwise_groups)
        self.elementwise = elementwise
        dense = [g for g in self.param_groups if g.get("name") not in self.rowwise_groups]
        self._dense = torch.optim.AdamW(dense, lr=lr, betas=betas, eps=eps) if dense else None

    @torch.no_grad()
    def step(self, closure=None):
        if self._dense is not None:
            self._dense.step()
        for group in self.param_groups:
            if group.get("name") not in self.rowwise_groups:
                continue
            for p in group["params"]:
                if p.grad is not None:
                    self._update_table(p, group)

    def _update_table(self, p: torch.Tensor, group: dict) -> None:
        """The row-wise rule on the rows of table p with a nonzero gradient (a variant of the rule, e.g.
        an experiment's, overrides this and keeps the rest of the optimizer)."""
        if p not in self.state or "rowwise" not in self.state[p]:
            self.state[p]["rowwise"] = RowwiseAdamState.zeros_like(p, elementwise=self.elementwise)
        rows = (p.grad != 0).any(dim=1).nonzero().squeeze(1)
        rowwise_adam_update_(
            p, self.state[p]["rowwise"], rows, p.grad[rows], group["lr"], group["betas"], group["eps"],
            group["weight_decay"],
        )  # fmt: skip

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none)
