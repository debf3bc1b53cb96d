"""PEER's ``query_norm_momentum``: the running statistics' rate of its query norm (beyond_paper.md P26-i).

The `ema` norm normalises a step's queries with statistics of the earlier steps only. At its default
rate they average all earlier batches at first, so they lag queries that move fast; a rate of 1 makes
them the previous batch's exactly. Checked against float64 arithmetic on random batches.
"""

import pytest
import torch

from torchpeer.layers.peer import PEER, PEERConfig
from torchpeer.layers.query_norm import build_query_norm
from torchpeer.lm import load_config

SMALL = dict(n_experts=64, heads=2, top_k=4, d_key=8, backend="torch")


def _ema_value(q, mean, var, eps=1e-5):
    return (q - mean) / torch.sqrt(var + eps)


@pytest.mark.parametrize("momentum", [None, 1.0, 0.5])
def test_the_third_batch_is_normalised_with_statistics_at_the_chosen_rate(momentum):
    torch.manual_seed(0)
    layer = PEER(16, query_norm="ema", query_norm_momentum=momentum, **SMALL).double().train()
    norm = layer.router.norm
    a, b, c = (torch.randn(32, 2, 8, dtype=torch.float64) * s + s for s in (1.0, 3.0, 5.0))
    norm(a)  # the first update takes a's statistics in full
    norm(b)  # the second: rate max(momentum, 1/2)
    rate = max(0.05 if momentum is None else momentum, 0.5)
    fa, fb = a.reshape(32, 16), b.reshape(32, 16)
    mean = (1 - rate) * fa.mean(0) + rate * fb.mean(0)
    var = (1 - rate) * fa.var(0) + rate * fb.var(0)  # unbiased, as BatchNorm's running variance
    want = _ema_value(c.reshape(32, 16), mean, var).reshape(32, 2, 8)
    torch.testing.assert_close(norm(c), want, rtol=1e-10, atol=1e-10)
    assert norm.momentum == (0.05 if momentum is None else momentum)


def test_a_later_batch_at_rate_one_sees_only_the_previous_batch():
    torch.manual_seed(1)
    norm = PEER(16, query_norm="ema", query_norm_momentum=1.0, **SMALL).double().train().router.norm
    batches = [torch.randn(24, 2, 8, dtype=torch.float64) * (i + 1) + i for i in range(5)]
    for x in batches[:4]:
        norm(x)
    prev = batches[3].reshape(24, 16)
    want = _ema_value(batches[4].reshape(24, 16), prev.mean(0), prev.var(0)).reshape(24, 2, 8)
    torch.testing.assert_close(norm(batches[4]), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind, momentum", [("batch", 0.3), ("ema_white", 0.2)])
def test_the_other_norms_with_running_statistics_take_it_too(kind, momentum):
    assert PEER(16, query_norm=kind, query_norm_momentum=momentum, **SMALL).router.norm.momentum == momentum


@pytest.mark.parametrize(
    "kind, momentum, match",
    [
        ("layer", 0.5, "applies to the query norms with running statistics"),
        ("none", 0.5, "not 'none': leave it unset"),
        ("ema", 0.0, r"must be a finite number in \(0, 1\], got 0.0"),
        ("ema", 1.5, r"must be a finite number in \(0, 1\], got 1.5"),
        ("ema", float("nan"), r"must be a finite number in \(0, 1\], got nan"),
        ("ema", True, "got True"),
        ("ema", "0.5", "got '0.5'"),
    ],
)
def test_bad_values_name_the_fix(kind, momentum, match):
    with pytest.raises(ValueError, match=match):
        PEER(16, query_norm=kind, query_norm_momentum=momentum, **SMALL)


@pytest.mark.parametrize("momentum", [0.0, -0.1, 1.01, float("inf"), "0.5", None])
def test_the_norms_own_momentum_check_is_the_same(momentum):
    """build_query_norm's ema statistics refuse what the router refuses, with the same message form
    (a string used to fail with a TypeError from the comparison)."""
    with pytest.raises(ValueError, match=r"momentum must be a finite number in \(0, 1\], got "):
        build_query_norm("ema", 2, 8, momentum=momentum)


def test_it_is_a_config_field_with_the_paper_default():
    assert PEERConfig().query_norm_momentum is None
    cfg = load_config("ptb-tiny", ["--model.ffw", "peer", "--model.peer.query_norm_momentum", "0.5"])
    assert cfg.model.peer.query_norm_momentum == 0.5
    with pytest.raises(ValueError, match="query_norm_momentum"):
        load_config("ptb-tiny", ["--model.ffw", "peer", "--model.peer.query_norm_momentum", "zero"])
