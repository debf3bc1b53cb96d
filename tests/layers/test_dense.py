"""DenseFFW against a float64 reference written from the definition; gradients, defaults, cost, errors."""

from __future__ import annotations

import pytest
import torch

from torchpeer.layers.dense import DenseFFW

from .float64 import ACT64, assert_grads


def dense_reference(m: DenseFFW, x):
    """float64 from the definition y = W2 act(W1 x) (gated: W2 (act(Wg x) * Wu x))."""
    x = x.double()
    lin = lambda layer, h: h @ layer.weight.double().t() + (0 if layer.bias is None else layer.bias.double())  # noqa: E731
    h = ACT64[m.activation](lin(m.fc_in, x))
    if m.swiglu:
        h = h * lin(m.fc_up, x)
    return lin(m.fc_out, h)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"activation": "relu", "bias": True},
        {"swiglu": True, "d_hidden": 24},
        {"swiglu": True, "activation": "gelu"},
    ],
)
def test_dense_matches_reference_and_grads(kw):
    torch.manual_seed(0)
    m = DenseFFW(16, **kw)
    x = torch.randn(2, 5, 16)
    y = m(x)
    assert y.shape == (2, 5, 16)
    ref = dense_reference(m, x)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.double()(x.double()), ref, atol=1e-12, rtol=1e-12)
    assert_grads(m, (m(x.double()) ** 2).sum())


def test_dense_defaults():
    assert DenseFFW(16).d_hidden == 64 and DenseFFW(16).activation == "gelu"
    g = DenseFFW(16, swiglu=True)
    assert g.activation == "silu" and g.fc_up is not None


def test_dense_cost_by_hand():
    # plain, d=16, hidden=64: W1 16*64 + W2 64*16 = 2048 params; 2 matmuls of 2*16*64 = 4096 FLOPs.
    c = DenseFFW(16, 64).cost()
    assert (c.total_params, c.active_params, c.forward_flops, c.aux_train_flops) == (2048, 2048, 4096, 0)
    # with biases: + 64 + 16 = 2128 params; FLOPs unchanged (bias adds are elementwise).
    assert DenseFFW(16, 64, bias=True).cost().total_params == 2128
    assert DenseFFW(16, 64, bias=True).cost().forward_flops == 4096
    # SwiGLU d=16, hidden=48: 3 * 16 * 48 = 2304 params, 3 * 2 * 16 * 48 = 4608 FLOPs; train = 3x.
    c = DenseFFW(16, 48, swiglu=True).cost()
    assert (c.total_params, c.active_params, c.forward_flops, c.train_flops) == (2304, 2304, 4608, 13824)


def test_dense_errors():
    with pytest.raises(ValueError, match="d_model must be a positive integer"):
        DenseFFW(0)
    with pytest.raises(ValueError, match="d_hidden must be a positive integer"):
        DenseFFW(8, d_hidden=-4)
    with pytest.raises(ValueError, match="unknown activation 'tanh'; use one of"):
        DenseFFW(8, activation="tanh")
    with pytest.raises(ValueError, match=r"expected input last dimension d_model=8, got 7"):
        DenseFFW(8)(torch.randn(2, 3, 7))
