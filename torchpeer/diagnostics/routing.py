"""Routing statistics of one product-key router, accumulated over an evaluation set.

``RoutingStats.update_routing(q, indices, gates)`` with q: (T, H, d_key) normalised queries (or
None), indices/gates: (T, H, k). ``summary()`` gives, besides the paper's usage % and KL
(``ExpertUsage``):

* ``head_usage_pct``: mean over heads of the share of experts head h selected at least once
  (``head_usage_pct_min`` the smallest head); ``head_overlap``: mean Jaccard index
  |S_a & S_b| / |S_a | S_b| of the heads' selected sets over all head pairs (1: all heads use the
  same experts).
* ``subkey_usage_pct_{0,1}``: share of the sqrt(N) sub-keys of each half that appear in a
  selected expert (expert i = a * sqrt(N) + b, half 0 is a, half 1 is b);
  ``subkey_top10_share_{0,1}``: share of all selections that go to the 10 most-selected sub-keys
  (10 / sqrt(N) when even: ``subkey_top10_share_even``).
* ``gate_entropy``: mean entropy (nats) of a head's gates over its k experts (normalised to sum 1;
  log k = ``gate_entropy_max`` when flat).
* ``query_eff_rank``: effective rank (``spectrum.effective_rank``) of each query half
  (d_key/2 wide, per head), averaged over heads and halves; ``query_eff_rank_max`` = d_key/2;
  ``query_participation``: same for the participation ratio; ``query_mean_energy``: share of the
  queries' mean square that is the mean vector, ||E q||^2 / E||q||^2 (a large common direction
  sends every token to the same sub-keys).
"""

from __future__ import annotations

import math

import torch

from .spectrum import RunningMoments, effective_rank, participation_ratio
from .usage import ExpertUsage


class RoutingStats(ExpertUsage):
    """ExpertUsage plus per-head, sub-key, gate and query statistics (see the module docstring).

    Args:
        n_experts: N. Sub-key statistics need N to be a perfect square (product keys).
    """

    def __init__(self, n_experts: int):
        super().__init__(n_experts)
        r = math.isqrt(n_experts)
        self.n_sub = r if r * r == n_experts and r > 1 else None
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.head_hits: torch.Tensor | None = None  # (H, N) bool
        self.sub_counts: torch.Tensor | None = None  # (2, sqrt N) float64
        self.gate_entropy_sum, self.gate_rows, self.top_k = None, 0, None  # entropy sum: 0-dim tensor
        self.moments = RunningMoments()
        self.sq_sum, self.q_rows = None, 0  # sq_sum: 0-dim float64 tensor

    @torch.no_grad()
    def update_routing(self, q: torch.Tensor | None, indices: torch.Tensor, gates: torch.Tensor) -> None:
        """q: (T, H, d_key) or None; indices, gates: (T, H, k) (or any matching shapes when q is None)."""
        self.update(indices, gates)
        if indices.dim() == 3:
            T, H, k = indices.shape
            self.top_k = k
            idx = indices.reshape(T, H * k).long()
            if self.head_hits is None or self.head_hits.shape[0] != H or self.head_hits.device != idx.device:
                self.head_hits = torch.zeros(H, self.n_experts, dtype=torch.bool, device=idx.device)
            offset = (torch.arange(H, device=idx.device) * self.n_experts).repeat_interleave(k)  # (H*k,)
            self.head_hits.view(-1)[(idx + offset).reshape(-1)] = True
            g = gates.detach().float()
            p = g / g.sum(-1, keepdim=True).clamp_min(1e-30)
            ent = -(p * p.clamp_min(1e-30).log()).sum().double()
            self.gate_entropy_sum = ent if self.gate_entropy_sum is None else self.gate_entropy_sum + ent
            self.gate_rows += T * H
        if self.n_sub is not None:
            flat = indices.reshape(-1).long()
            halves = (flat // self.n_sub, flat % self.n_sub)
            counts = torch.stack([torch.bincount(h, minlength=self.n_sub) for h in halves]).double()
            self.sub_counts = counts if self.sub_counts is None else self.sub_counts.to(counts.device) + counts
        if q is not None:
            if q.dim() != 3 or q.shape[-1] % 2:
                raise ValueError(f"queries must be (T, H, d_key) with d_key even, got shape {tuple(q.shape)}")
            T, H, dk = q.shape
            qf = q.detach().float()
            self.moments.update(qf.reshape(T, 2 * H, dk // 2))
            sq = torch.linalg.vector_norm(qf).double().square() / (2 * H)
            self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq.to(self.sq_sum.device)
            self.q_rows += T

    @torch.no_grad()
    def reduce_(self, all_reduce_sum) -> None:
        """Merge the statistics of all processes in place (data parallel evaluation: each process
        saw its own tokens). ``all_reduce_sum(t)`` sums a float64 tensor over the processes in place,
        e.g. ``torch.distributed.all_reduce``. Every process must have tracked at least one batch."""
        if self.scores is None:
            raise ValueError("RoutingStats.reduce_ needs at least one update on every process")
        device = self.scores.device
        all_reduce_sum(self.scores)
        if self.head_hits is not None:
            hits = self.head_hits.double()
            all_reduce_sum(hits)
            self.head_hits = hits > 0
        if self.sub_counts is not None:
            all_reduce_sum(self.sub_counts)
        totals = torch.tensor([float(self.gate_rows), float(self.q_rows)], dtype=torch.float64, device=device)
        sums = torch.stack(
            [
                (
                    self.gate_entropy_sum if self.gate_entropy_sum is not None else torch.zeros((), dtype=torch.float64)
                ).to(device),
                (self.sq_sum if self.sq_sum is not None else torch.zeros((), dtype=torch.float64)).to(device),
            ]
        )
        all_reduce_sum(totals)
        all_reduce_sum(sums)
        self.gate_rows, self.q_rows = int(totals[0].item()), int(totals[1].item())
        self.gate_entropy_sum, self.sq_sum = sums[0], sums[1]
        if self.moments.mean is not None:
            self.moments.reduce_(all_reduce_sum)

    def summary(self) -> dict[str, float]:
        out = super().summary()
        if self.head_hits is not None:
            hits = self.head_hits
            out["head_usage_pct"] = 100.0 * hits.float().mean(1).mean().item()
            out["head_usage_pct_min"] = 100.0 * hits.float().mean(1).min().item()
            H = hits.shape[0]
            if H > 1:
                jac = []
                for a in range(H):
                    for b in range(a + 1, H):
                        inter = (hits[a] & hits[b]).sum().item()
                        union = (hits[a] | hits[b]).sum().item()
                        jac.append(inter / union if union else 0.0)
                out["head_overlap"] = sum(jac) / len(jac)
        if self.gate_rows:
            out["gate_entropy"] = self.gate_entropy_sum.item() / self.gate_rows
            out["gate_entropy_max"] = math.log(self.top_k)
        if self.sub_counts is not None and self.sub_counts.sum() > 0:
            for half in (0, 1):
                c = self.sub_counts[half]
                out[f"subkey_usage_pct_{half}"] = 100.0 * (c > 0).double().mean().item()
                top = c.topk(min(10, c.numel())).values.sum()
                out[f"subkey_top10_share_{half}"] = (top / c.sum()).item()
            out["subkey_top10_share_even"] = min(10, self.n_sub) / self.n_sub
        if self.moments.n >= 2:
            evals = torch.linalg.eigvalsh(self.moments.cov())
            # directions with < 1e-6 of the top variance are fp32 rounding noise of the outer products
            evals = torch.where(evals > 1e-6 * evals.amax(-1, keepdim=True), evals, 0.0)
            out["query_eff_rank"] = effective_rank(evals).mean().item()
            out["query_participation"] = participation_ratio(evals).mean().item()
            out["query_eff_rank_max"] = float(evals.shape[-1])
            mean_sq = self.moments.mean.square().sum(-1).mean().item()
            out["query_mean_energy"] = mean_sq / max(self.sq_sum.item() / self.q_rows, 1e-300)
        return out
