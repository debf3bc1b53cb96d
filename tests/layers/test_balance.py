"""The sub-key balance term (PEER balance_weight): its value on constructed routing (uniform -> 1, one
sub-key -> n), against a float64 loop on random routing (shared and per-head keys, strided), its
gradients, PEER's aux_loss() plumbing into the LM, that minimising it spreads a collapsed router, cost."""

import math

import pytest
import torch

from torchpeer.layers.balance import balance_train_flops, subkey_balance_loss, subkey_marginals
from torchpeer.layers.peer import PEER, PEERConfig
from torchpeer.lm.config import ModelConfig
from torchpeer.lm.info import config_cost
from torchpeer.lm.model import TransformerLM


def test_uniform_marginals_give_one_its_minimum_over_consistent_routing():
    n, m = 4, 3
    q = torch.zeros(n * n, 1, 2 * m)  # every score 0: softmax exactly uniform
    keys = torch.randn(1, 2, n, m)
    idx = torch.arange(n * n).view(-1, 1, 1)  # every expert once: both halves' counts uniform
    assert subkey_balance_loss(q, keys, idx).item() == pytest.approx(1.0, abs=1e-7)
    # Consistent routings (hard counts = soft marginals, f = P) are never below the uniform value:
    for p in (torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.4, 0.4, 0.1, 0.1])):
        assert n * (p * p).sum() > 1.0


def test_all_queries_on_one_sub_key_give_n_its_maximum():
    n, m = 8, 4
    keys = torch.randn(1, 2, n, m) * 0.01
    keys[0, :, 5] = torch.tensor([100.0, 0, 0, 0])  # sub-key 5 wins every score by far in both halves
    q = torch.zeros(10, 2, 2 * m)
    q[..., 0] = q[..., m] = 1.0
    idx = torch.full((10, 2, 3), 5 * n + 5)  # every selection: sub-key 5 of both halves
    assert subkey_balance_loss(q, keys, idx).item() == pytest.approx(n, rel=1e-6)
    # and any routing stays in [0, n]
    torch.manual_seed(0)
    for _ in range(5):
        q, idx = torch.randn(10, 2, 2 * m) * 3, torch.randint(0, n * n, (10, 2, 3))
        assert 0.0 <= subkey_balance_loss(q, torch.randn(1, 2, n, m), idx).item() <= n


def loop_float64(q, keys, idx, stride):
    """n * mean over key sets and halves of sum_j f_j P_j, by explicit loops in float64."""
    T, H, dk = q.shape
    S, _, n, m = keys.shape
    q, keys = q.double(), keys.double()
    total = 0.0
    for s in range(S):
        heads = range(H) if S == 1 else [s]
        for c in range(2):
            counts = torch.zeros(n, dtype=torch.float64)
            for t in range(T):
                for h in heads:
                    for i in idx[t, h].tolist():
                        counts[(i // n) if c == 0 else (i % n)] += 1
            f = counts / counts.sum()
            probs = [
                torch.softmax(keys[s, c] @ q[t, h, c * m : (c + 1) * m], 0) for t in range(0, T, stride) for h in heads
            ]
            total = total + n * (f * torch.stack(probs).mean(0)).sum()
    return total / (2 * S)


@pytest.mark.parametrize("key_sets,stride", [(1, 1), (1, 3), (3, 1), (3, 2)])
def test_value_and_gradient_match_a_float64_loop(key_sets, stride):
    torch.manual_seed(key_sets + stride)
    T, H, n, m, K = 7, 3, 5, 2, 4
    q = torch.randn(T, H, 2 * m, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(key_sets, 2, n, m, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, n * n, (T, H, K))
    val = subkey_balance_loss(q, keys, idx, stride)
    ref = loop_float64(q, keys, idx, stride)
    torch.testing.assert_close(val.double(), ref)
    grads = torch.autograd.grad(val, (q, keys))
    grads_ref = torch.autograd.grad(ref, (q, keys))
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)
    assert grads[1].abs().sum() > 0
    if stride > 1:  # tokens off the stride carry no soft-marginal gradient
        assert grads[0][1].abs().sum() == 0 and grads[0][0].abs().sum() > 0


def test_peer_aux_loss_is_the_weighted_term_of_the_last_training_forward():
    torch.manual_seed(0)
    kw = dict(n_experts=64, heads=2, top_k=3, d_key=8, query_norm="layer")
    off = PEER(16, **kw)
    x = torch.randn(20, 16)
    off(x)
    assert off.aux_loss() is None  # weight 0: nothing computed
    m = PEER(16, balance_weight=0.25, balance_stride=2, **kw)
    y = m(x)
    q = m.query(x)
    _, idx = m.retrieve(x)
    expected = 0.25 * subkey_balance_loss(q, m.sub_keys, idx, 2)
    torch.testing.assert_close(m.aux_loss(), expected)
    (y.sum() + m.aux_loss()).backward()
    assert m.sub_keys.grad.abs().sum() > 0 and m.query_proj.weight.grad.abs().sum() > 0
    m.eval()
    m(x)
    assert m.aux_loss() is None  # not a training forward
    m.train()
    with torch.no_grad():
        m(x)
    assert m.aux_loss() is None


def test_a_compiled_peer_with_the_term_is_one_graph_with_the_eager_value():
    # the recommended configs train with the term under torch.compile: a graph break in it (bincount's
    # data-dependent length did, four a layer) costs a compiled step its fusion and recompiles per layer
    torch._dynamo.reset()
    torch.manual_seed(0)
    kw = dict(n_experts=64, heads=2, top_k=3, d_key=8, query_norm="layer", backend="torch")
    m = PEER(16, balance_weight=0.25, balance_stride=2, **kw)
    x = torch.randn(2, 10, 16)
    explained = torch._dynamo.explain(m)(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    m(x)
    eager = m.aux_loss()
    torch.compile(m, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(m.aux_loss(), eager)


def test_lm_aux_loss_sums_the_peer_layers_terms():
    torch.manual_seed(0)
    peer = PEERConfig(n_experts=64, heads=2, top_k=4, d_key=16, balance_weight=0.1)
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=2, seq_len=16, vocab_size=50, placement=[0, 2], peer=peer)
    model = TransformerLM(cfg)
    ids = torch.randint(0, 50, (2, 16))
    model(ids, ids)
    aux = model.aux_loss()
    layers = [model.blocks[i].ffw for i in (0, 2)]
    torch.testing.assert_close(aux, sum(layer.aux_loss() for layer in layers))
    assert all(1.0 <= layer.balance_loss.item() <= 8 for layer in layers)


def test_minimising_the_term_spreads_a_collapsed_router():
    """Real behaviour: the router's sub-key use, concentrated by construction, spreads under the term alone."""
    torch.manual_seed(0)
    m = PEER(16, n_experts=16**2, heads=2, top_k=4, d_key=8, query_norm="none", balance_weight=1.0)
    with torch.no_grad():  # a rank-1 query net: every query is +-the same direction, few sub-keys win
        m.query_proj.weight.copy_(torch.outer(torch.randn(16), torch.randn(16)) + 0.01 * torch.randn(16, 16))
    x = torch.randn(256, 16)

    def used():
        """Sub-keys (of 2 x 16) that take 90 % of the selections."""
        _, idx = m.retrieve(x)
        f, _ = subkey_marginals(m.query(x), m.sub_keys, idx.view(256, 2, 4))
        shares = f.flatten(0, 1).sort(-1, descending=True).values.cumsum(-1)
        return (shares < 0.9).sum().item() + 2

    before = used()
    opt = torch.optim.Adam(m.router.parameters(), lr=0.05)
    first = None
    for _ in range(25):
        m(x)
        loss = m.aux_loss()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = used()
    assert loss.item() < 0.7 * first
    assert after >= 2 * before, (before, after)


def test_cost_counts_the_term_as_training_only_flops():
    d, h, n, dk = 32, 2, 8, 16
    kw = dict(n_experts=n * n, heads=h, top_k=4, d_key=dk)
    off, on = PEER(d, **kw).cost(), PEER(d, balance_weight=0.01, balance_stride=3, **kw).cost()
    per_token = 3 * h * 2 * 2 * (dk // 2) * n  # forward + 2x backward of every sub-key score
    assert balance_train_flops(h, n, dk, 1) == per_token
    assert on.aux_train_flops == math.ceil(per_token / 3)
    assert on.forward_flops == off.forward_flops and on.total_params == off.total_params
    assert on.train_flops == off.train_flops + math.ceil(per_token / 3)
    peer = PEERConfig(n_experts=n * n, heads=h, top_k=4, d_key=dk)
    cfg = ModelConfig(d_model=d, n_layers=3, n_heads=2, seq_len=16, vocab_size=50, placement="all", peer=peer)
    base = config_cost(cfg)
    cfg.peer.balance_weight = 0.01
    with_term = config_cost(cfg)
    assert with_term.forward_flops == base.forward_flops
    assert with_term.train_flops == base.train_flops + 3 * per_token  # three PEER blocks


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(balance_weight=-0.1), "balance_weight must be a finite number >= 0"),
        (dict(balance_weight=float("nan")), "balance_weight must be a finite number"),
        (dict(balance_stride=0), "balance_stride must be a positive integer"),
    ],
)
def test_bad_balance_options(kw, match):
    with pytest.raises(ValueError, match=match):
        PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, **kw)
