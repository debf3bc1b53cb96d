"""Routing diagnostics on constructed cases with known answers."""

import math
import threading

import pytest
import torch
from torch import nn

from torchpeer import ExpertUsage, enable_usage_tracking, usage_report
from torchpeer.diagnostics import (
    RoutingStats,
    RunningMoments,
    UsageTrackingMixin,
    effective_rank,
    participation_ratio,
    routing_report,
)

N_SUB = 8
N = N_SUB * N_SUB


def test_uniform_routing_full_usage_zero_kl():
    st = RoutingStats(N)
    T, H, k = N, 2, 4
    # token t, head h, slot j -> expert (t + h * 7 + j * 16) % N: each expert gets the same mass
    t = torch.arange(T).view(T, 1, 1)
    idx = (t + torch.arange(H).view(1, H, 1) * 7 + torch.arange(k).view(1, 1, k) * 16) % N
    gates = torch.full((T, H, k), 1.0 / k)
    st.update_routing(None, idx, gates)
    s = st.summary()
    assert s["usage_pct"] == 100.0
    assert abs(s["kl"]) < 1e-12
    assert s["head_usage_pct"] == 100.0 and s["head_overlap"] == 1.0
    assert s["subkey_usage_pct_0"] == 100.0 and s["subkey_usage_pct_1"] == 100.0
    assert s["subkey_top10_share_0"] == pytest.approx(min(10, N_SUB) / N_SUB)
    assert s["gate_entropy"] == pytest.approx(math.log(k))


def test_all_mass_on_one_expert():
    st = RoutingStats(N)
    idx = torch.full((50, 2, 3), 13)
    g = torch.rand(50, 2, 3) + 0.1
    st.update_routing(None, idx, g)
    s = st.summary()
    assert s["kl"] == pytest.approx(math.log(N))
    assert s["usage_pct"] == pytest.approx(100.0 / N)
    assert s["subkey_usage_pct_0"] == pytest.approx(100.0 / N_SUB)
    assert s["subkey_top10_share_0"] == 1.0


def test_kl_matches_float64_reference_on_random_routing():
    torch.manual_seed(0)
    st = RoutingStats(N)
    mass = torch.zeros(N, dtype=torch.float64)
    for _ in range(3):
        idx = torch.randint(0, N // 2, (40, 2, 3))
        g = torch.rand(40, 2, 3)
        st.update_routing(None, idx, g)
        mass.index_add_(0, idx.reshape(-1), g.reshape(-1).double())
    z = mass / mass.sum()
    nz = z[z > 0]
    assert st.summary()["kl"] == pytest.approx(math.log(N) + (nz * nz.log()).sum().item(), rel=1e-12)
    assert st.summary()["usage_pct"] == pytest.approx(100.0 * (mass > 0).double().mean().item())


def test_head_usage_and_overlap_disjoint_heads():
    st = RoutingStats(N)
    T = 100
    idx = torch.stack([torch.randint(0, 16, (T, 1)), torch.randint(32, 48, (T, 1))], dim=1)  # (T, 2, 1)
    st.update_routing(None, idx, torch.ones(T, 2, 1))
    s = st.summary()
    assert s["head_overlap"] == 0.0
    assert s["head_usage_pct"] == pytest.approx(100.0 * 16 / N)  # 100 draws of 16 values hit all w.h.p.


def test_effective_rank_constructed():
    m = 16
    assert effective_rank(torch.tensor([5.0] + [0.0] * (m - 1))).item() == pytest.approx(1.0)
    assert effective_rank(torch.ones(m)).item() == pytest.approx(m)
    assert participation_ratio(torch.ones(m)).item() == pytest.approx(m)
    assert participation_ratio(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(1.0)


def test_query_rank_one_and_isotropic():
    torch.manual_seed(0)
    T, H, dk = 4000, 2, 16
    direction = torch.randn(H, dk)
    q1 = torch.randn(T, 1, 1) * direction + 0.0  # every head and half lies on one line
    st = RoutingStats(N)
    idx = torch.randint(0, N, (T, H, 2))
    for chunk in q1.split(1000):
        st.update_routing(chunk, idx[: len(chunk)], torch.ones(len(chunk), H, 2))
    assert st.summary()["query_eff_rank"] == pytest.approx(1.0, abs=1e-3)
    st.reset()
    st.update_routing(torch.randn(T, H, dk) + 3.0, idx, torch.ones(T, H, 2))
    s = st.summary()
    assert s["query_eff_rank"] > 0.97 * (dk // 2) and s["query_eff_rank_max"] == dk // 2
    assert s["query_mean_energy"] == pytest.approx(9.0 / 10.0, abs=0.02)


def test_running_moments_match_float64_batch():
    torch.manual_seed(3)
    x = torch.randn(900, 3, 5) * 4 + 100.0
    rm = RunningMoments()
    for c in x.split(301):
        rm.update(c)
    xd = x.double().transpose(0, 1)  # (g, T, m)
    ref = torch.stack([torch.cov(g.T) for g in xd])
    torch.testing.assert_close(rm.cov(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rm.mean, x.double().mean(0), rtol=1e-6, atol=1e-6)


class _Toy(UsageTrackingMixin, nn.Module):
    n_experts = N

    def __init__(self):
        super().__init__()
        self.sub_keys = nn.Parameter(torch.randn(1, 2, N_SUB, 4))

    def forward(self, q, idx, g):
        self._track_routing(q, idx, g)
        return q


def test_model_reports_and_back_compat():
    model = nn.Sequential(_Toy())
    assert enable_usage_tracking(model) == 1
    q = torch.randn(10, 2, 8)
    model[0](q, torch.randint(0, N, (10, 2, 3)), torch.rand(10, 2, 3))
    model[0]._track_usage(torch.randint(0, N, (10, 2, 3)), torch.rand(10, 2, 3))
    rep = routing_report(model)["0"]
    assert {"usage_pct", "kl", "head_overlap", "query_eff_rank", "subkey_norm_median"} <= set(rep)
    assert set(usage_report(model)["0"]) == {"usage_pct", "kl"}
    assert isinstance(model[0].usage_tracker, ExpertUsage)
    enable_usage_tracking(model, False)
    assert routing_report(model) == {}


def test_bad_input():
    with pytest.raises(ValueError, match="n_experts"):
        RoutingStats(0)
    with pytest.raises(ValueError, match="must match"):
        RoutingStats(N).update_routing(None, torch.zeros(3, 2, 1, dtype=torch.long), torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="queries must be"):
        idx = torch.zeros(3, 2, 1, dtype=torch.long)
        RoutingStats(N).update_routing(torch.randn(3, 2, 5), idx, torch.ones(3, 2, 1))


def test_reduce_over_processes_matches_one_process():
    """Two 'processes' (trackers) merged with a simulated all-reduce give the statistics of one
    tracker that saw all the tokens."""
    torch.manual_seed(5)
    batches = [(torch.randn(50, 2, 8) * 3 + 1, torch.randint(0, N, (50, 2, 3)), torch.rand(50, 2, 3)) for _ in range(4)]
    whole, ranks = RoutingStats(N), [RoutingStats(N), RoutingStats(N)]
    for i, (q, idx, g) in enumerate(batches):
        whole.update_routing(q, idx, g)
        ranks[i % 2].update_routing(q, idx, g)
    barrier = threading.Barrier(2, timeout=30)  # a failing rank breaks the barrier instead of hanging
    slots: list = [None, None]

    def make_reduce(rank):
        def all_reduce_sum(t):
            slots[rank] = t.clone()
            barrier.wait()
            t.copy_(slots[0] + slots[1])
            barrier.wait()

        return all_reduce_sum

    threads = [threading.Thread(target=ranks[r].reduce_, args=(make_reduce(r),)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = whole.summary()
    for r in ranks:
        got = r.summary()
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-9), key
