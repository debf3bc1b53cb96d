"""Sub-keys initialised from the data's queries (PEER key_init="queries"): what the keys become, once
only, without touching the norm's statistics, and kept across a state-dict round trip."""

import math

import pytest
import torch
import torch.nn.functional as F

from torchpeer.layers.key_init import data_queries
from torchpeer.layers.peer import PEER


def layer(**kw) -> PEER:
    opts = dict(n_experts=8**2, heads=3, top_k=2, d_key=6, key_init="queries")
    return PEER(12, **{**opts, **kw})


@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize("query_norm", ["ema", "batch", "layer", "ema_white"])
def test_first_training_forward_sets_each_sub_key_to_a_query_direction(query_norm, shared_keys):
    torch.manual_seed(0)
    m = layer(query_norm=query_norm, shared_keys=shared_keys)
    x = torch.randn(40, 12) + 2.0  # an offset: raw queries share a mean direction, normalised ones do not
    q = data_queries(m.router, x)  # before the forward: what the keys will be drawn from
    assert not m.keys_initialised
    m(x)
    assert m.keys_initialised and not m._keys_pending
    S, _, n, half = m.sub_keys.shape
    halves = q.view(40, 3, 2, half)
    norms = m.sub_keys.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(half / 6)))  # the random init's norm
    for s in range(S):
        for c in range(2):
            cand = F.normalize((halves[:, :, c] if S == 1 else halves[:, s : s + 1, c]).reshape(-1, half), dim=-1)
            cos = F.normalize(m.sub_keys[s, c], dim=-1) @ cand.T  # (n, candidates)
            best = cos.max(-1)
            torch.testing.assert_close(best.values, torch.ones(n), rtol=0, atol=1e-5)
            assert len(set(best.indices.tolist())) == n  # distinct samples


def test_ema_queries_are_the_batch_standardised_projection_and_the_norm_is_untouched():
    torch.manual_seed(1)
    m, twin = layer(), layer(key_init="random")
    twin.load_state_dict({k: v for k, v in m.state_dict().items() if k != "keys_initialised"})
    x = torch.randn(50, 12) * 3 + 1
    z = x @ m.query_proj.weight.T
    expected = (z - z.mean(0)) / torch.sqrt(z.var(0) + m.norm.eps)  # running variance: unbiased, as BatchNorm's
    torch.testing.assert_close(data_queries(m.router, x).view(50, -1), expected, rtol=1e-4, atol=1e-4)
    m(x), twin(x)
    for name, buf in m.norm.named_buffers():  # the init ran on a copy of the norm
        torch.testing.assert_close(buf, dict(twin.norm.named_buffers())[name], msg=name)


def test_only_once_and_only_in_training():
    torch.manual_seed(2)
    m = layer()
    x = torch.randn(30, 12)
    random_keys = m.sub_keys.detach().clone()
    m.eval()
    m(x)  # evaluation never initialises
    assert torch.equal(m.sub_keys, random_keys) and m._keys_pending
    m.train()
    m(x)
    first = m.sub_keys.detach().clone()
    assert not torch.equal(first, random_keys)
    m(torch.randn(30, 12))  # a second batch: no re-initialisation
    assert torch.equal(m.sub_keys, first)


def test_state_dict_round_trip_never_reinitialises():
    torch.manual_seed(3)
    m = layer()
    m(torch.randn(30, 12))
    resumed = layer()
    resumed.load_state_dict(m.state_dict())  # a resumed run: keys and the flag come back
    assert not resumed._keys_pending
    resumed(torch.randn(30, 12))
    assert torch.equal(resumed.sub_keys, m.sub_keys)
    # weights of a layer without key_init (no flag): its keys are given, kept as they are
    plain = layer(key_init="random")
    adopted = layer()
    adopted.load_state_dict(plain.state_dict())
    assert adopted.keys_initialised and not adopted._keys_pending
    adopted(torch.randn(30, 12))
    assert torch.equal(adopted.sub_keys, plain.sub_keys)
    assert "keys_initialised" not in plain.state_dict()  # default layers keep their state-dict keys


def test_bad_key_init():
    with pytest.raises(ValueError, match="unknown key_init 'data'"):
        layer(key_init="data")
