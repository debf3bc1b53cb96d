"""MoE (expert / token choice) against a float64 reference (loops over experts and tokens); gradients,
capacity rules, the balance loss and aux_loss(), usage tracking, cost by hand, errors."""

from __future__ import annotations

import math

import pytest
import torch

from torchpeer.layers.moe import MoE
from torchpeer.usage import enable_usage_tracking, usage_report

from .float64 import ACT64, assert_grads


def expert64(m: MoE, e: int, xt):
    """float64 output of expert e for one token vector xt: (d,)."""
    h = ACT64[m.activation](xt @ m.w_in[e].double())
    return h @ m.w_out[e].double()


def moe_reference(m: MoE, x):
    """float64 MoE by loops over experts and tokens, straight from the routing rules."""
    x = x.double().reshape(-1, m.d_model)
    T, E = x.shape[0], m.n_experts
    probs = torch.softmax(x @ m.router.weight.double().t(), dim=-1)
    C = min(T, max(1, math.ceil(m.capacity_factor * m.top_k * T / E)))
    y = torch.zeros_like(x)
    if m.routing == "expert_choice":
        for e in range(E):
            chosen = sorted(range(T), key=lambda t: -probs[t, e].item())[:C]
            for t in chosen:
                y[t] += probs[t, e] * expert64(m, e, x[t])
        return y
    choices = []  # (rank, token, expert, gate)
    for t in range(T):
        experts = sorted(range(E), key=lambda e: -probs[t, e].item())[: m.top_k]
        total = sum(probs[t, e] for e in experts) if m.top_k > 1 else 1.0
        choices += [(r, t, e, probs[t, e] / total) for r, e in enumerate(experts)]
    load = [0] * E
    for _, t, e, g in sorted(choices, key=lambda c: (c[0], c[1])):
        if load[e] < C:
            load[e] += 1
            y[t] += g * expert64(m, e, x[t])
    return y


MOE_CONFIGS = [
    dict(routing="expert_choice"),
    dict(routing="expert_choice", capacity_factor=2.0),
    dict(routing="expert_choice", capacity_factor=0.6, activation="relu"),
    dict(routing="token_choice", top_k=1),
    dict(routing="token_choice", top_k=2, capacity_factor=1.0),
    dict(routing="token_choice", top_k=2, capacity_factor=0.5),
]


@pytest.mark.parametrize("kw", MOE_CONFIGS)
def test_moe_matches_reference(kw):
    torch.manual_seed(1)
    m = MoE(8, n_experts=4, d_expert=16, **kw)
    x = torch.randn(3, 10, 8)
    y = m(x)
    assert y.shape == (3, 10, 8)
    ref = moe_reference(m, x).view(3, 10, 8)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m.double()(x.double()), ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(
    "kw", [dict(routing="expert_choice"), dict(routing="token_choice", top_k=2, capacity_factor=2.0)]
)
def test_moe_grads(kw):
    torch.manual_seed(2)
    m = MoE(8, n_experts=4, d_expert=16, **kw).double()
    x = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
    assert_grads(m, (m(x) ** 2).sum())
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_moe_token_choice_top1_router_gets_task_gradient():
    # top_k=1 uses the raw probability as gate (Switch), so the router learns from the task loss.
    torch.manual_seed(3)
    m = MoE(8, n_experts=4, d_expert=16, routing="token_choice", top_k=1, capacity_factor=4.0)
    m(torch.randn(32, 8)).pow(2).sum().backward()
    assert m.router.weight.grad.abs().sum() > 0


def test_expert_choice_capacity():
    torch.manual_seed(4)
    m = MoE(8, n_experts=4, d_expert=16, routing="expert_choice")
    # C = ceil(cf * top_k * T / E), clamped to [1, T]; T = 24, E = 4.
    assert m.capacity(24) == 6  # 1.0 * 24 / 4
    for cf, c in [(0.5, 3), (1.3, 8), (100.0, 24), (0.01, 1)]:  # 3; ceil(7.8) = 8; min(T, 600); max(1, .06)
        assert MoE(8, n_experts=4, d_expert=16, capacity_factor=cf).capacity(24) == c
    assert MoE(8, n_experts=4, d_expert=16, top_k=2).capacity(24) == 12

    m.enable_usage_tracking()
    x = torch.randn(24, 8)
    y = m(x)
    probs = torch.softmax(m.router(x), dim=-1)
    tokens, gates, experts = m._expert_choice(probs, m.capacity(24))
    picked = tokens.view(4, 6)
    for e in range(4):  # each expert takes exactly C distinct tokens, the C most probable for it
        assert len(set(picked[e].tolist())) == 6
        assert set(picked[e].tolist()) == set(probs[:, e].topk(6).indices.tolist())
    times = torch.bincount(tokens, minlength=24)
    assert times.sum() == 24 and (times == 0).any() and (times >= 2).any()
    # A token no expert picked gets exactly zero output; the others do not.
    assert (y[times == 0] == 0).all() and (y[times > 0].abs().sum(-1) > 0).all()
    # Usage: every expert processed C tokens; accumulated scores are the gates of its tokens.
    s = m.usage_tracker.scores
    torch.testing.assert_close(s, probs.detach().double().t().topk(6).values.sum(-1))
    summary = m.usage_tracker.summary()
    assert summary["usage_pct"] == 100.0 and 0 <= summary["kl"] < math.log(4)
    # Changing capacity_factor changes the number of tokens each expert processes.
    m.capacity_factor = 0.5
    assert torch.bincount(m._expert_choice(probs, m.capacity(24))[2]).tolist() == [3, 3, 3, 3]
    assert isinstance(m.balance_loss, torch.Tensor) and m.balance_loss.item() == 0.0


def test_token_choice_overflow_dropping():
    torch.manual_seed(5)
    T, E = 12, 4
    m = MoE(8, n_experts=E, d_expert=16, routing="token_choice", top_k=1)
    with torch.no_grad():  # every (positive) token strongly prefers expert 0
        m.router.weight.zero_()
        m.router.weight[0] = 5.0
    x = torch.rand(T, 8) + 0.5
    y = m(x)
    C = m.capacity(T)
    assert C == 3  # ceil(1.0 * 1 * 12 / 4)
    p0 = torch.softmax(m.router(x).double(), -1)[:, 0]
    expected = torch.stack([p0[t] * expert64(m, 0, x[t].double()) for t in range(C)])
    torch.testing.assert_close(y[:C].double(), expected, atol=1e-5, rtol=1e-4)
    assert (y[C:] == 0).all()  # the later tokens overflowed expert 0 and were dropped
    # Switch aux loss: all assignments on expert 0 (f = [1, 0, 0, 0]) -> E * P_0 ~ E.
    torch.testing.assert_close(m.balance_loss, E * torch.softmax(m.router(x), -1)[:, 0].mean())
    assert m.balance_loss.item() > 3.9
    # With enough capacity nothing is dropped.
    m.capacity_factor = E
    assert (m(x).abs().sum(-1) > 0).all()


def test_token_choice_aux_loss_formula_and_gradient():
    torch.manual_seed(6)
    m = MoE(8, n_experts=4, d_expert=16, routing="token_choice", top_k=2)
    x = torch.randn(40, 8)
    m(x)
    probs = torch.softmax(m.router(x), -1)
    frac = torch.bincount(probs.topk(2, -1).indices.reshape(-1), minlength=4).float() / 80
    torch.testing.assert_close(m.balance_loss, 4 * (frac * probs.mean(0)).sum())
    assert 0.9 < m.balance_loss.item() < 2.0  # ~1 for near-uniform routing
    m.router.weight.grad = None
    m.balance_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0
    # aux_loss() is the weighted term the trainer adds (Switch weight 0.01 by default; 0 = off).
    torch.testing.assert_close(m.aux_loss(), 0.01 * m.balance_loss)
    m.aux_loss_weight = 0.5
    torch.testing.assert_close(m.aux_loss(), 0.5 * m.balance_loss)
    assert MoE(8, n_experts=4, aux_loss_weight=0.0, routing="token_choice")(x).shape == x.shape
    assert MoE(8, n_experts=4).aux_loss() is None  # no forward yet


def test_token_choice_usage_counts_only_kept_assignments():
    torch.manual_seed(7)
    m = MoE(8, n_experts=4, d_expert=16, routing="token_choice", top_k=1)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 5.0
    assert enable_usage_tracking(m) == 1
    x = torch.rand(12, 8) + 0.5
    m(x)
    p0 = torch.softmax(m.router(x).double(), -1)[:3, 0].sum()
    torch.testing.assert_close(m.usage_tracker.scores, torch.tensor([p0.item(), 0, 0, 0], dtype=torch.float64))
    rep = usage_report(m)["."]
    assert rep["usage_pct"] == 25.0
    assert rep["kl"] == pytest.approx(math.log(4))  # all mass on one expert


def test_moe_cost_by_hand():
    # d=8, E=4, d_expert=32: router 8*4 = 32 params; each expert 2*8*32 = 512; total 32 + 4*512 = 2080.
    # FLOPs: router 2*8*4 = 64; one expert 2*8*32 + 2*32*8 = 1024.
    ec = MoE(8, n_experts=4, d_expert=32).cost()
    assert (ec.total_params, ec.active_params, ec.forward_flops) == (2080, 32 + 512, 64 + 1024)
    ec2 = MoE(8, n_experts=4, d_expert=32, capacity_factor=2.0).cost()  # 2 experts per token on average
    assert (ec2.active_params, ec2.forward_flops) == (32 + 1024, 64 + 2048)
    tc = MoE(8, n_experts=4, d_expert=32, routing="token_choice", top_k=2, capacity_factor=1.25).cost()
    assert (tc.total_params, tc.active_params, tc.forward_flops) == (2080, 32 + 1024, 64 + 2048)
    assert MoE(8, n_experts=4).d_expert == 32  # default 4 * d_model


def test_moe_errors():
    with pytest.raises(ValueError, match="unknown routing 'topk'"):
        MoE(8, routing="topk")
    with pytest.raises(ValueError, match="capacity_factor must be a positive number"):
        MoE(8, capacity_factor=0)
    with pytest.raises(ValueError, match="n_experts must be a positive integer"):
        MoE(8, n_experts=0)
    with pytest.raises(ValueError, match="top_k=5 must be <= n_experts=4"):
        MoE(8, n_experts=4, routing="token_choice", top_k=5)
    with pytest.raises(ValueError, match="unknown activation"):
        MoE(8, n_experts=4, activation="swish")
    with pytest.raises(ValueError, match=r"expected input last dimension d_model=8, got 9"):
        MoE(8, n_experts=4)(torch.randn(3, 9))


def test_token_choice_empty_slots_spread_over_tokens():
    """Empty slots (gate 0) must not all gather token 0: on a GPU the gather's backward and the output's
    index_add_ then pile thousands of atomic adds onto one row. Each token may appear in the slot map
    at most top_k times (its kept choices) + ceil(E*C / T) times (empty slots)."""
    torch.manual_seed(3)
    m = MoE(8, n_experts=4, d_expert=16, routing="token_choice", top_k=1, capacity_factor=2.0)
    x = torch.randn(40, 8)
    # route every token to expert 0 so that the other experts' slots are empty
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 1.0
        x = x.abs() + 0.1
    probs = torch.softmax(m.router(x).float(), -1)
    C = m.capacity(40)
    tokens, gates, _ = m._token_choice(probs, C)
    empty = gates == 0
    assert empty.sum() >= 3 * C  # experts 1-3 got nothing
    mult = torch.bincount(tokens, minlength=40)
    assert int(mult.max()) <= m.top_k + math.ceil(tokens.numel() / 40)
    torch.testing.assert_close(m(x).double(), moe_reference(m, x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2])
def test_token_choice_compiles_as_one_graph_with_the_eager_values(top_k):
    """Token choice's dispatch has fixed shapes (no bincount, no boolean mask): dynamo sees one graph
    (bincount and the mask broke it into nine), and the compiled layer gives eager's output, balance
    loss and gradients, with assignments dropped at capacity (a router skewed to expert 0). The
    campaign's MoE runs are token choice; a break costs a compiled step its fusion."""
    torch._dynamo.reset()
    torch.manual_seed(9)
    eager = MoE(8, n_experts=4, d_expert=16, routing="token_choice", top_k=top_k, capacity_factor=1.0)
    with torch.no_grad():
        eager.router.weight[0] += 1.5  # most tokens pick expert 0 first: its queue overflows
    compiled = MoE(8, n_experts=4, d_expert=16, routing="token_choice", top_k=top_k, capacity_factor=1.0)
    compiled.load_state_dict(eager.state_dict())
    x = torch.rand(2, 20, 8) + 0.2
    explained = torch._dynamo.explain(MoE(8, n_experts=4, d_expert=16, routing="token_choice", top_k=top_k))(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]

    def step(m, x):
        y = m(x)
        return y, (y.square().sum() + m.aux_loss())

    y_e, loss_e = step(eager, x)
    y_c, loss_c = torch.compile(step, backend="aot_eager", fullgraph=True)(compiled, x)
    assert (y_e.abs().sum(-1) == 0).any()  # some tokens lost every assignment at capacity
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(compiled.balance_loss, eager.balance_loss)
    loss_e.backward()
    loss_c.backward()
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, msg=name)
