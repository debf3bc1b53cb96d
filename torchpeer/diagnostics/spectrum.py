"""Spectral summaries of a set of vectors (used for the routing queries).

For vectors with covariance C (centred), eigenvalues lambda_1..m >= 0:

* effective rank (Roy & Vetterli 2007): exp(H(p)), p_i = s_i / sum_j s_j with s_i = sqrt(lambda_i)
  the singular values of the centred data matrix (up to a common factor). 1 for rank-1 data, m for
  isotropic data.
* participation ratio: (sum lambda)^2 / sum lambda^2, also 1 .. m, more sensitive to the top
  directions.
"""

from __future__ import annotations

import torch


def effective_rank(eigenvalues: torch.Tensor) -> torch.Tensor:
    """exp(entropy of normalised singular values). eigenvalues: (..., m) of a covariance -> (...)."""
    s = eigenvalues.clamp_min(0).sqrt()
    p = s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    ent = -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)
    return ent.exp()


def participation_ratio(eigenvalues: torch.Tensor) -> torch.Tensor:
    """(sum lambda)^2 / sum lambda^2. eigenvalues: (..., m) -> (...)."""
    lam = eigenvalues.clamp_min(0)
    return lam.sum(-1).square() / lam.square().sum(-1).clamp_min(torch.finfo(lam.dtype).tiny)


class RunningMoments:
    """Mean and covariance of grouped vectors accumulated over batches (Chan et al.'s merge, in
    float64, so that a large mean does not swamp the covariance).

    update(x): x (T, groups, m). ``mean`` (groups, m), ``cov()`` (groups, m, m).
    """

    def __init__(self):
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None  # sum of centred outer products

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(f"expected (T, groups, m), got shape {tuple(x.shape)}")
        T = x.shape[0]
        if T == 0:
            return
        # The batch is centred on its own mean before the (fp32) outer products, so a large mean
        # does not cost precision; batches are merged in float64.
        x = x.detach().float()
        b_mean = x.mean(0)
        xc = x - b_mean
        b_m2 = torch.einsum("tgi,tgj->gij", xc, xc).double()
        b_mean = b_mean.double()
        if self.mean is None:
            self.n, self.mean, self.m2 = T, b_mean, b_m2
            return
        n = self.n + T
        delta = b_mean - self.mean.to(b_mean.device)
        self.m2 = self.m2.to(b_mean.device) + b_m2 + torch.einsum("gi,gj->gij", delta, delta) * (self.n * T / n)
        self.mean = self.mean.to(b_mean.device) + delta * (T / n)
        self.n = n

    @torch.no_grad()
    def reduce_(self, all_reduce_sum) -> None:
        """Merge the moments of all processes in place. ``all_reduce_sum(t)`` sums a float64 tensor
        over the processes in place (e.g. ``torch.distributed.all_reduce``); every process must have
        updated at least once, with the same groups and width."""
        if self.mean is None:
            raise ValueError("RunningMoments.reduce_ needs at least one update on every process")
        n = torch.tensor([float(self.n)], dtype=torch.float64, device=self.mean.device)
        s1 = self.mean * self.n  # raw sums: reduce those, then re-centre once (exact up to rounding)
        s2 = self.m2 + torch.einsum("gi,gj->gij", self.mean, self.mean) * self.n
        for t in (n, s1, s2):
            all_reduce_sum(t)
        self.n = int(n.item())
        self.mean = s1 / self.n
        self.m2 = s2 - torch.einsum("gi,gj->gij", self.mean, self.mean) * self.n

    def cov(self) -> torch.Tensor:
        if self.m2 is None or self.n < 2:
            raise ValueError("need at least 2 vectors for a covariance")
        return self.m2 / (self.n - 1)
