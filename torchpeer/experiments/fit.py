"""isoFLOP fits (Chinchilla approach 2, as in the PEER paper's Fig. 1).

At one training budget C, models of different sizes N are each trained on C / (training FLOPs
per token) tokens. Final loss against log N is close to a parabola near its minimum; the fitted
vertex is the compute-optimal size at C:

    loss(N) ~ a u^2 + b u + c,   u = log10 N,   N* = 10^(-b / 2a),   loss* = c - b^2 / 4a

A fit needs >= 3 sizes (4+ that bracket the minimum for a trustworthy vertex) and a > 0. The runs
bracket the optimum (``bracketed``) when the vertex lies inside the measured sizes AND the best
measured size is not the smallest or largest one: a parabola over points that only rise from one
end (e.g. losses 2.975, 2.99, 3.13, 3.63 from small to large) still puts its vertex inside, pulled
there by the far points, while the data say only "at or beyond the edge".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class IsoFLOPFit:
    """Quadratic fit of loss in log10(params); ``optimum_params`` is None without a minimum."""

    coeffs: tuple[float, float, float]  # a, b, c of a u^2 + b u + c, u = log10(params)
    n_points: int
    min_params: float
    max_params: float
    optimum_params: float | None
    optimum_loss: float | None
    residual_rms: float
    best_params: float  # the measured size of least loss (mean over repeats of one size)
    best_loss: float  # that size's loss (the mean over its repeats)

    @property
    def best_at_edge(self) -> bool:
        """True when the best measured size is the smallest or the largest one trained."""
        return self.best_params in (self.min_params, self.max_params)

    @property
    def vertex_above_data(self) -> bool:
        """True when the fitted loss lies above the best measured size's by more than the rms residual.

        The least-squares parabola then does not follow the curve near its minimum (a sharp V whose
        far sizes pull the vertex up), so its loss overstates the family's best: read the best run too.
        """
        # 1e-6 nats: an exact parabola's vertex may round a hair above its own data point
        return self.optimum_loss is not None and self.optimum_loss - self.best_loss > max(self.residual_rms, 1e-6)

    @property
    def bracketed(self) -> bool:
        """True when the fitted optimum lies inside the trained sizes and the measured minimum is interior."""
        if self.optimum_params is None or self.best_at_edge:
            return False
        return self.min_params <= self.optimum_params <= self.max_params

    def predict(self, params) -> np.ndarray:
        a, b, c = self.coeffs
        u = np.log10(np.asarray(params, dtype=np.float64))
        return a * u * u + b * u + c


def fit_isoflop(params: Sequence[float], losses: Sequence[float]) -> IsoFLOPFit:
    """Fit loss = quadratic(log10 params) by least squares. params: (n,) > 0, losses: (n,), n >= 3."""
    p = np.asarray(params, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"params and losses must be 1-d of one length, got {p.shape} and {y.shape}")
    ok = np.isfinite(p) & np.isfinite(y)
    p, y = p[ok], y[ok]
    if (p <= 0).any():
        raise ValueError("params must be positive to take their log")
    if len(np.unique(p)) < 3:
        raise ValueError(f"an isoFLOP fit needs at least 3 distinct model sizes, got {len(np.unique(p))}")
    u = np.log10(p)
    sizes = np.unique(p)
    best_p = float(min(sizes, key=lambda q: float(y[p == q].mean())))
    best_l = float(y[p == best_p].mean())
    a, b, c = (float(v) for v in np.polyfit(u, y, 2))
    resid = y - (a * u * u + b * u + c)
    opt_p = opt_l = None
    if a > 0:
        u_star = -b / (2 * a)
        opt_p, opt_l = float(10**u_star), float(c - b * b / (4 * a))
        if not math.isfinite(opt_p):
            opt_p = opt_l = None
    return IsoFLOPFit(
        coeffs=(a, b, c),
        n_points=len(p),
        min_params=float(p.min()),
        max_params=float(p.max()),
        optimum_params=opt_p,
        optimum_loss=opt_l,
        residual_rms=float(np.sqrt(np.mean(resid**2))),
        best_params=best_p,
        best_loss=best_l,
    )


def isoflop_fits(
    records: list[dict], params_key: str = "active_params", max_epochs: float | None = None
) -> dict[tuple[str, float], dict]:
    """Per (family, budget): the runs (sorted by size), the best run and the fit (or why there is none).

    records: results.jsonl lines of one isoFLOP sweep (budget runs only). Seeds of one size are one
    point of the fit (their mean loss). max_epochs: the data rule; a run with more epochs is left
    out of its group (fit, best run, sizes) entirely: ``outside_fit_runs`` lists those. Returns
    {(family, budget): {"runs": [...], "best": record, "fit": IsoFLOPFit | None, "note": str,
    "n_sizes": int}}; a (family, budget) with no run inside the rule has no entry.
    """
    from torchpeer.experiments.compare import by_size
    from torchpeer.experiments.results import breaks_epoch_rule, primary_loss

    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        if r.get("budget_flops") is None or primary_loss(r) is None:
            continue
        if breaks_epoch_rule(r.get("epochs"), max_epochs):
            continue
        groups.setdefault((r["family"], float(r["budget_flops"])), []).append(r)
    out = {}
    for key in sorted(groups, key=lambda k: (k[1], k[0])):
        runs = sorted(groups[key], key=lambda r: r[params_key])
        best = min(runs, key=primary_loss)
        # one point per size: the mean loss over its seeds (several seeds of one size are one x)
        sizes = by_size(runs, params_key)
        fit, note = None, ""
        try:
            fit = fit_isoflop(list(sizes), [sum(map(primary_loss, v)) / len(v) for v in sizes.values()])
        except ValueError as e:
            note = str(e)
        if fit is not None and fit.optimum_params is None:
            note = "no minimum: the loss is not convex in log(params) over these sizes"
        elif fit is not None and fit.best_at_edge:
            side = "smallest" if fit.best_params == fit.min_params else "largest"
            where = "at or below" if side == "smallest" else "at or above"
            note = f"the best measured size is the {side} trained: the optimum is {where} it; add sizes on that side"
        elif fit is not None and not fit.bracketed:
            note = "optimum outside the trained sizes: add sizes on that side"
        elif fit is not None and fit.vertex_above_data:
            note = (
                f"the fitted loss {fit.optimum_loss:.4f} lies {fit.optimum_loss - fit.best_loss:.3f} above the best"
                f" measured size's {fit.best_loss:.4f}, more than the fit's rms residual ({fit.residual_rms:.3f}):"
                " the parabola does not follow the curve near its minimum; read the best run beside the fit"
            )
        out[key] = {"runs": runs, "best": best, "fit": fit, "note": note, "n_sizes": len(sizes)}
    return out


def outside_fit_runs(records: list[dict], max_epochs: float | None) -> list[dict]:
    """The budget runs with a loss that ``isoflop_fits`` leaves out under the data rule
    ``max_epochs`` (more epochs than it allows), in record order; [] without a rule."""
    from torchpeer.experiments.results import breaks_epoch_rule, primary_loss

    return [
        r
        for r in records
        if r.get("budget_flops") is not None
        and primary_loss(r) is not None
        and breaks_epoch_rule(r.get("epochs"), max_epochs)
    ]
