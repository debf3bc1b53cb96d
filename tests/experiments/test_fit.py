"""isoFLOP fit: the vertex of loss against log10(params) on synthetic data with a known minimum."""

import math

import numpy as np
import pytest

from torchpeer.experiments import fit_isoflop, isoflop_fits


def parabola(params, n_opt, curvature=0.3, floor=3.0):
    u = np.log10(params)
    return floor + curvature * (u - math.log10(n_opt)) ** 2


@pytest.mark.parametrize("n_opt", [2.5e6, 7.0e6, 3.1e7])
def test_fit_finds_the_minimum_of_a_parabola(n_opt):
    rng = np.random.default_rng(0)
    params = np.geomspace(1e6, 1e8, 6)
    losses = parabola(params, n_opt) + rng.normal(0, 1e-3, size=6)
    fit = fit_isoflop(params, losses)
    assert fit.optimum_params == pytest.approx(n_opt, rel=0.05)
    assert fit.optimum_loss == pytest.approx(3.0, abs=3e-3)
    assert fit.bracketed and fit.n_points == 6 and fit.residual_rms < 3e-3
    assert fit.coeffs[0] == pytest.approx(0.3, rel=0.05)
    np.testing.assert_allclose(fit.predict(params), parabola(params, n_opt), atol=5e-3)


def test_exact_parabola_and_unsorted_input():
    params = [4e6, 1e6, 16e6, 2e6]
    fit = fit_isoflop(params, parabola(np.array(params), 4e6))
    assert fit.optimum_params == pytest.approx(4e6, rel=1e-9)
    assert (fit.min_params, fit.max_params) == (1e6, 16e6)


def test_no_minimum_and_outside_the_bracket():
    params = np.geomspace(1e6, 1e7, 4)
    concave = fit_isoflop(params, 5.0 - parabola(params, 3e6))
    assert concave.optimum_params is None and not concave.bracketed
    outside = fit_isoflop(params, parabola(params, 1e9))  # still falling at the largest size
    assert outside.optimum_params == pytest.approx(1e9, rel=1e-6) and not outside.bracketed


def test_fit_needs_three_sizes_and_positive_params():
    with pytest.raises(ValueError, match="at least 3 distinct model sizes, got 2"):
        fit_isoflop([1e6, 2e6, 2e6], [3.0, 2.9, 2.9])
    with pytest.raises(ValueError, match="positive"):
        fit_isoflop([0, 1e6, 2e6], [3.0, 2.9, 2.8])
    with pytest.raises(ValueError, match="one length"):
        fit_isoflop([1e6, 2e6], [3.0])


def _rec(family, budget, params, loss):
    return {
        "run": f"{family}-{params:.0f}-{budget:g}",
        "family": family,
        "budget_flops": budget,
        "active_params": params,
        "eval_set": "v",
        "valid": {"v": {"loss": loss}},
    }


def test_isoflop_fits_groups_by_family_and_budget():
    recs = []
    for budget, n_opt in ((1e15, 3e6), (1e16, 1e7)):
        for fam, floor in (("dense", 3.2), ("peer", 3.1)):
            for p in np.geomspace(1e6, 3e7, 5):
                recs.append(_rec(fam, budget, float(p), float(parabola(p, n_opt, floor=floor))))
    recs.append(_rec("moe", 1e15, 1e6, 3.5))  # one size only: no fit, but still a best run
    fits = isoflop_fits(recs)
    assert list(fits) == [("dense", 1e15), ("moe", 1e15), ("peer", 1e15), ("dense", 1e16), ("peer", 1e16)]
    assert fits[("peer", 1e16)]["fit"].optimum_params == pytest.approx(1e7, rel=1e-6)
    assert fits[("dense", 1e15)]["fit"].optimum_loss == pytest.approx(3.2, abs=1e-9)
    best = fits[("peer", 1e15)]["best"]
    assert best["valid"]["v"]["loss"] == min(r["valid"]["v"]["loss"] for r in fits[("peer", 1e15)]["runs"])
    assert fits[("moe", 1e15)]["fit"] is None and "at least 3" in fits[("moe", 1e15)]["note"]


@pytest.mark.parametrize("rising_to", ["large", "small"])
def test_best_run_at_an_edge_is_not_a_bracket_even_with_the_vertex_inside(rising_to):
    # The 1e16 dense column of the isoFLOP study: the loss only rises from the smallest size, yet the
    # parabola's vertex lands inside the sizes (16.1M), pulled there by the far, steep point.
    params = [11.4e6, 16.9e6, 33.6e6, 59.7e6]
    losses = [2.9750, 2.9905, 3.1260, 3.6285]
    if rising_to == "small":  # the mirror image: the best size is the largest
        params = [1e14 / p for p in params]
    fit = fit_isoflop(params, losses)
    assert fit.min_params < fit.optimum_params < fit.max_params  # the vertex alone would call it bracketed
    assert fit.best_at_edge and not fit.bracketed
    assert fit.best_params == (11.4e6 if rising_to == "large" else 1e14 / 11.4e6)
    recs = [_rec("dense", 1e16, p, loss) for p, loss in zip(params, losses)]
    note = isoflop_fits(recs)[("dense", 1e16)]["note"]
    side = "smallest" if rising_to == "large" else "largest"
    assert f"best measured size is the {side} trained" in note and "add sizes on that side" in note


def test_best_size_is_the_mean_over_repeats_of_one_size():
    # Three sizes; the middle one has two seeds whose mean is the lowest, though one seed of the
    # smallest size is lower than either: the middle is the measured minimum, so it brackets.
    fit = fit_isoflop([1e6, 1e6, 2e6, 2e6, 4e6], [2.80, 3.20, 2.90, 2.92, 3.10])
    assert fit.best_params == 2e6 and not fit.best_at_edge


def test_a_vertex_above_the_best_measured_size_is_noted():
    # isoflop-lrw's token-choice MoE at 1e15 (campaign.md Batch 23): a sharp V at the middle size;
    # the parabola through all five sizes puts its vertex 0.033 above the best run (rms 0.029).
    params = [1.2e6, 1.92e6, 2.9e6, 4.94e6, 7.38e6]
    losses = [3.7325, 3.6059, 3.4623, 3.5701, 3.7721]
    fit = fit_isoflop(params, losses)
    assert fit.bracketed and fit.best_params == 2.9e6 and fit.best_loss == 3.4623
    assert fit.optimum_loss - fit.best_loss > fit.residual_rms > 0 and fit.vertex_above_data
    note = isoflop_fits([_rec("moe", 1e15, p, loss) for p, loss in zip(params, losses)])[("moe", 1e15)]["note"]
    assert f"lies {fit.optimum_loss - 3.4623:.3f} above the best measured size's 3.4623" in note
    # PEER's curve of the same study: the vertex below its best run, no note
    peer = [3.6276, 3.5041, 3.4502, 3.5503, 3.8651]
    peer_fit = fit_isoflop(params, peer)
    assert peer_fit.optimum_loss < peer_fit.best_loss and not peer_fit.vertex_above_data
    assert isoflop_fits([_rec("peer", 1e15, p, loss) for p, loss in zip(params, peer)])[("peer", 1e15)]["note"] == ""
    # an exact parabola: residual 0, vertex below every point
    assert not fit_isoflop([1e6, 2e6, 4e6], parabola(np.array([1e6, 2e6, 4e6]), 2e6)).vertex_above_data
