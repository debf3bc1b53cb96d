"""Expert usage and KL(z || uniform): the paper's Table 2 statistics."""

import math

import pytest
import torch

from torchpeer.layers.peer import PEER
from torchpeer.usage import ExpertUsage, enable_usage_tracking, usage_report


def test_uniform_routing_gives_zero_kl_and_full_usage():
    u = ExpertUsage(64)
    idx = torch.arange(64).repeat(5)
    u.update(idx, torch.full(idx.shape, 0.25))
    assert u.usage() == pytest.approx(100.0)
    assert u.kl() == pytest.approx(0.0, abs=1e-12)


def test_all_mass_on_one_expert_gives_log_n():
    u = ExpertUsage(1000)
    u.update(torch.full((7, 3), 42), torch.rand(7, 3) + 0.1)
    assert u.usage() == pytest.approx(0.1)
    assert u.kl() == pytest.approx(math.log(1000), rel=1e-12)


def test_kl_matches_direct_formula_on_random_scores():
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (200, 4), generator=g)
    w = torch.rand(200, 4, generator=g, dtype=torch.float64)
    u = ExpertUsage(50)
    u.update(idx[:100], w[:100])
    u.update(idx[100:], w[100:])  # accumulates across calls
    s = torch.zeros(50, dtype=torch.float64).index_add_(0, idx.flatten(), w.flatten())
    z = s / s.sum()
    want = sum(float(p * math.log(p / (1 / 50))) for p in z if p > 0)
    assert u.kl() == pytest.approx(want, rel=1e-10)
    assert u.usage() == pytest.approx(100.0 * float((s > 0).float().mean()))


def test_usage_validation():
    with pytest.raises(ValueError, match="n_experts"):
        ExpertUsage(0)
    with pytest.raises(ValueError, match="must match"):
        ExpertUsage(4).update(torch.zeros(3, dtype=torch.long), torch.ones(4))


def test_peer_tracking_through_model():
    m = torch.nn.Sequential(PEER(16, n_experts=64, heads=2, top_k=4, d_key=8), torch.nn.Linear(16, 16))
    assert usage_report(m) == {}
    assert enable_usage_tracking(m) == 1
    with torch.no_grad():
        m(torch.randn(50, 16))
    rep = usage_report(m)["0"]
    tracker = m[0].usage_tracker
    assert tracker.scores.sum().item() == pytest.approx(50 * 2)  # softmax gates sum to 1 per head
    assert 0 < rep["usage_pct"] <= 100 and 0 <= rep["kl"] <= math.log(64)
    enable_usage_tracking(m, False)
    assert usage_report(m) == {}
