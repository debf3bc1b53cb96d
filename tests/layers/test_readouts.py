"""PEER's read-outs beyond act(u.x) v (readout "linear", "glu", "gated"): the layer against a float64
reference built from public pieces (forward and every gradient) on every backend, the Triton
kernels under TRITON_INTERPRET=1, the fused table optimizer's rules, costs. The ops themselves
(expert_mix with lin= / activation "identity") are tested in tests/ops/test_mixing_glu.py."""

import pytest
import torch

from tests.references import assert_backward_matches, naive_float64
from torchpeer.layers.peer import PEER
from torchpeer.layers.readout import mix_activation
from torchpeer.ops import expert_mix, product_key_topk_reference


def _inputs(T=11, d=6, N=20, H=2, K=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    down, up, lin = (torch.randn(N, d, generator=g, dtype=dtype) for _ in range(3))
    idx = torch.randint(0, N, (T, H, K), generator=g)
    gates = torch.rand(T, H, K, generator=g, dtype=dtype)
    return x, down, up, lin, idx, gates


def test_linear_readout_is_the_identity_activation_and_glu_takes_lin():
    """What the layer asks of expert_mix per read-out: (u.x) v for "linear" whatever the layer's
    activation; act(u.x) (w.x) v for "glu"."""
    x, down, up, lin, idx, gates = _inputs()
    assert mix_activation("linear", "relu") == "identity" and mix_activation("glu", "relu") == "relu"
    y = expert_mix(x, down, up, idx, gates, mix_activation("linear", "gelu"), backend="torch")
    torch.testing.assert_close(
        y, torch.einsum("thk,thkd->td", gates * torch.einsum("td,thkd->thk", x, down[idx]), up[idx])
    )
    y = expert_mix(x, down, up, idx, gates, "relu", lin=lin, backend="torch")
    torch.testing.assert_close(y, naive_float64(x, down, up, idx, gates, "relu", lin=lin))


def layer_reference(m: PEER, x: torch.Tensor) -> torch.Tensor:
    """float64 PEER forward from public pieces: query -> brute-force top-k -> gates -> loop formula (-> gate)."""
    flat = x.reshape(-1, m.d_model)
    scores, idx = product_key_topk_reference(m.query(flat), m.sub_keys, m.top_k)
    lin = m.lin if m.readout == "glu" else None
    act = "identity" if m.readout == "linear" else m.activation
    y = naive_float64(flat, m.down, m.up, idx, m.gates(scores), act, lin=lin)
    if m.readout == "gated":
        y = m.out_gate.proj(y * (m.out_gate.gate(flat) * torch.sigmoid(m.out_gate.gate(flat))))
    return y.view(x.shape)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("readout", ["paper", "linear", "glu", "gated"])
def test_layer_readouts_match_float64_reference(readout, backend):
    torch.manual_seed(0)
    kw = dict(n_experts=49, heads=2, top_k=3, d_key=8, readout=readout, backend=backend, query_norm="layer")
    m = PEER(12, **kw).double()
    ref = PEER(12, **kw).double()
    ref.load_state_dict(m.state_dict())
    assert ("lin" in dict(m.named_parameters())) == (readout == "glu")
    assert (m.out_gate is not None) == (readout == "gated")
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    assert_backward_matches(m, ref, x, x_ref, m(x), layer_reference(ref, x_ref), True, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("readout", ["linear", "glu", "gated"])
def test_readouts_run_through_the_triton_kernels(readout):
    pytest.importorskip("triton")  # conftest sets TRITON_INTERPRET=1 without a GPU
    torch.manual_seed(2)
    kw = dict(n_experts=49, heads=2, top_k=3, d_key=8, readout=readout)
    m = PEER(16, backend="triton", **kw)
    assert m.op_backends() == {"product_key_topk": "triton", "expert_mix": "triton"}
    ref = PEER(16, backend="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(13, 16, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    assert_backward_matches(m, ref, x, x_ref, m(x), layer_reference(ref, x_ref), True)


def test_auto_backend_mixes_every_readout_with_the_kernels_where_retrieval_has_them():
    for readout in ("linear", "glu"):
        m = PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, readout=readout)
        assert m.op_backends("cpu") == {"product_key_topk": "torch", "expert_mix": "torch"}
        if m.router.retrieval_backend("cuda") == "triton":  # triton installed: what "auto" picks on a GPU
            assert m.op_backends("cuda") == {"product_key_topk": "triton", "expert_mix": "triton"}
    with pytest.raises(ValueError, match="set readout='linear' instead"):
        PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, activation="identity")  # that is readout="linear"


def test_readout_costs_by_hand():
    d, h, k, n, dk = 16, 2, 4, 8, 8
    base = dict(n_experts=n * n, heads=h, top_k=k, d_key=dk, query_norm="none")
    router_params = d * h * dk + 2 * n * (dk // 2)
    router_flops = 2 * d * h * dk + h * 2 * 2 * (dk // 2) * n
    costs = {r: PEER(d, readout=r, **base).cost() for r in ("paper", "linear", "glu", "gated")}
    assert costs["paper"] == costs["linear"]
    assert costs["paper"].forward_flops == router_flops + h * k * 4 * d
    assert costs["paper"].total_params == router_params + 2 * n * n * d
    assert costs["glu"].forward_flops == router_flops + h * k * 6 * d  # w . x as well
    assert costs["glu"].active_params == router_params + h * k * 3 * d
    assert costs["glu"].total_params == router_params + 3 * n * n * d
    assert costs["gated"].forward_flops == costs["paper"].forward_flops + 2 * 2 * d * d  # W_g x, W_o (.)
    assert costs["gated"].total_params == costs["paper"].total_params + 2 * d * d
    assert costs["gated"].active_params == costs["paper"].active_params + 2 * d * d


def test_fused_table_optimizer_refuses_what_it_cannot_update():
    m = PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, readout="glu")
    with pytest.raises(ValueError, match="rowwise_adam"):
        m.table_update = lambda *a: None
    for readout in ("linear", "gated"):  # both mix the paper's two tables: allowed
        ok = PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, readout=readout)
        ok.table_update = fn = lambda *a: None
        assert ok.table_update is fn
        ok.table_update = None
        assert ok.table_update is None


def test_fused_table_optimizer_gets_the_identity_activation_for_linear():
    """The linear read-out through a table optimizer's mixing: it is called with activation
    "identity", and the layer's output is what that mixing returns."""
    torch.manual_seed(3)
    m = PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, readout="linear", activation="relu").eval()
    seen = []

    def mixer(x, down, up, idx, gates, activation):
        seen.append(activation)
        return expert_mix(x, down, up, idx, gates, activation, backend="reference")

    x = torch.randn(5, 8)
    want = m(x)
    m.table_update = mixer
    torch.testing.assert_close(m(x), want)
    assert seen == ["identity"]


def test_a_misspelt_choice_lists_the_choices_and_the_nearest():
    with pytest.raises(
        ValueError, match=r"unknown readout 'gluu' \(did you mean 'glu'\?\); use one of: paper, linear, glu, gated$"
    ):
        PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, readout="gluu")
    with pytest.raises(ValueError, match=r"unknown query_norm 'bn'; use one of: batch, layer, none, ema"):
        PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, query_norm="bn")
    with pytest.raises(ValueError, match=r"unknown key_norm 'L2' \(did you mean 'l2'\?\)"):
        PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, key_norm="L2")
