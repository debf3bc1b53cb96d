"""ProductKeyRouter shared by PEER and PKM: retrieve() == what forward mixes (with and without autocast),
PKM on the Triton retrieval (TRITON_INTERPRET=1) against the float64 reference, backend choice and
report, old attribute names and state-dict keys."""

import os

import pytest
import torch

import torchpeer.layers.peer as peer_module
import torchpeer.layers.router as router_module
from tests.references import assert_backward_matches
from torchpeer import PEER, PKM, ProductKeyRouter, backend_report
from torchpeer.ops import product_key_topk_reference

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _small_peer(**kw):
    return PEER(16, n_experts=64, heads=2, top_k=4, d_key=8, **kw)


def _spy_mix(monkeypatch):
    """Record the indices PEER.forward hands to expert_mix."""
    seen = []
    real = peer_module.expert_mix

    def spy(x, down, up, indices, gates, activation, **kw):
        seen.append(indices.clone())
        return real(x, down, up, indices, gates, activation, **kw)

    monkeypatch.setattr(peer_module, "expert_mix", spy)
    return seen


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("query_norm", ["batch", "layer", "ema"])
def test_peer_retrieve_returns_the_indices_forward_mixes(monkeypatch, autocast, query_norm):
    torch.manual_seed(0)
    m = _small_peer(query_norm=query_norm).eval()
    x = torch.randn(3, 7, 16)
    seen = _spy_mix(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        scores, indices = m.retrieve(x)
        y = m(x)
    assert y.shape == x.shape and len(seen) == 1
    assert indices.shape == (3, 7, 2, 4) and scores.dtype == torch.float32
    assert torch.equal(indices.reshape(-1, 2, 4), seen[0])
    if autocast:
        # retrieval really ran in bf16 (the case where the old inline forward and retrieve() disagreed):
        # the bf16 query differs from the fp32 one, and scores are what bf16 q . bf16 keys give.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q = m.query(x.reshape(-1, 16)).to(torch.bfloat16)
        ref_scores, ref_idx = product_key_topk_reference(q.double(), m.sub_keys.to(torch.bfloat16).double(), 4)
        torch.testing.assert_close(scores.reshape(-1, 2, 4).double(), ref_scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(indices.reshape(-1, 2, 4), ref_idx)


def test_retrieve_and_forward_agree_in_train_mode_with_batch_statistics(monkeypatch):
    torch.manual_seed(1)
    m = _small_peer(query_norm="batch").train()  # ("ema" updates its statistics at every train-mode call)
    x = torch.randn(40, 16)
    seen = _spy_mix(monkeypatch)
    _, indices = m.retrieve(x)
    m(x)
    assert torch.equal(indices, seen[0])


def test_pkm_retrieve_returns_the_memories_forward_reads():
    torch.manual_seed(2)
    m = PKM(16, n_keys=8, heads=2, top_k=3, d_key=8).eval()
    x = torch.randn(11, 16)
    scores, indices = m.retrieve(x)
    w = scores.softmax(-1)
    expected = torch.einsum("thk,thkv->tv", w, m.values[indices])
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("query_norm,value_dim", [("batch", None), ("layer", 12)])
def test_pkm_triton_retrieval_matches_the_float64_reference(query_norm, value_dim):
    pytest.importorskip("triton")
    torch.manual_seed(3)
    kw = dict(n_keys=7, heads=2, top_k=3, d_key=8, query_norm=query_norm, value_dim=value_dim)
    m = PKM(16, backend="triton", **kw)
    ref = PKM(16, backend="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(13, 16, requires_grad=True)  # ragged token count
    x_ref = x.detach().double().requires_grad_()
    assert m.op_backends() == {"product_key_topk": "triton"}
    _, idx = m.retrieve(x)
    _, idx_ref = ref.retrieve(x_ref)
    assert torch.equal(idx, idx_ref)
    assert_backward_matches(m, ref, x, x_ref, m(x), ref(x_ref), nonzero_grads=True)


def test_pkm_and_peer_share_one_router_class():
    peer, pkm = _small_peer(), PKM(16, n_keys=8, heads=2, top_k=3, d_key=8)
    assert type(peer.router) is type(pkm.router) is ProductKeyRouter
    assert peer.router.key_sets == 1 and pkm.router.key_sets == 2
    assert peer.query_proj.bias is None and pkm.query_proj.bias is not None
    assert peer.sub_keys is peer.router.sub_keys and pkm.norm is pkm.router.norm


def test_requested_backend_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pkm = PKM(8, n_keys=4, heads=1, top_k=2, d_key=4, backend="triton")
    with pytest.raises(ValueError, match="backend='torch'"):
        pkm(torch.randn(3, 8))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        PKM(8, n_keys=4, heads=1, top_k=2, d_key=4, backend="cuda")


def test_backend_report_names_every_routed_layer():
    from torchpeer.layers import DenseFFW, MoE

    model = torch.nn.ModuleDict(
        {
            "peer": _small_peer(),
            "pkm": PKM(16, n_keys=4, heads=2, top_k=2, d_key=4, backend="reference"),
            "dense": DenseFFW(16),
            "moe": MoE(16, n_experts=2),
        }
    )
    assert backend_report(model) == {
        "peer": {"product_key_topk": "torch", "expert_mix": "torch"},
        "pkm": {"product_key_topk": "reference"},
    }


def test_router_outputs_and_errors():
    torch.manual_seed(4)
    r = ProductKeyRouter(12, n_keys=5, heads=3, top_k=4, d_key=6, query_norm="none", key_sets=3)
    x = torch.randn(9, 12)
    q, scores, indices = r(x)
    assert q.shape == (9, 3, 6) and scores.shape == indices.shape == (9, 3, 4)
    ref_s, ref_i = product_key_topk_reference(r.query(x).double(), r.sub_keys.double(), 4)
    assert torch.equal(indices, ref_i)
    torch.testing.assert_close(scores.double(), ref_s, rtol=1e-5, atol=1e-6)
    cost = r.cost()
    assert cost.forward_flops == 2 * 12 * 18 + 3 * 2 * 2 * 3 * 5 and cost.active_params == cost.total_params
    with pytest.raises(ValueError, match="top_k=6 must be <= n_keys=5"):
        ProductKeyRouter(12, n_keys=5, heads=3, top_k=6, d_key=6)
    with pytest.raises(ValueError, match="d_key must be even"):
        ProductKeyRouter(12, n_keys=5, heads=3, top_k=2, d_key=5)
    with pytest.raises(ValueError, match="key_sets must be 1"):
        ProductKeyRouter(12, n_keys=5, heads=3, top_k=2, d_key=6, key_sets=2)
    with pytest.raises(ValueError, match="unknown query_norm 'rms'"):
        ProductKeyRouter(12, n_keys=5, heads=3, top_k=2, d_key=6, query_norm="rms")
    with pytest.raises(ValueError, match="d_model=12"):
        r(torch.randn(2, 11))
    with pytest.raises(TypeError, match="n_experts must be an int"):
        PEER(8, n_experts=64.0, heads=1, top_k=2, d_key=4)


@pytest.mark.parametrize("make", [_small_peer, lambda: PKM(16, n_keys=4, heads=2, top_k=2, d_key=4)])
def test_state_dict_with_the_old_flat_router_keys_loads(make):
    torch.manual_seed(5)
    src, dst = make().eval(), make().eval()
    src.norm.running_mean.normal_()  # a buffer too
    old_style = {k.replace("router.", "", 1): v for k, v in src.state_dict().items()}
    assert "sub_keys" in old_style and "query_proj.weight" in old_style
    dst.load_state_dict(old_style, strict=True)
    x = torch.randn(5, 16)
    torch.testing.assert_close(dst(x), src(x))
    # nested (as inside a TransformerLM block) and the new keys load too
    wrapped = torch.nn.ModuleDict({"ffw": make()})
    wrapped.load_state_dict({f"ffw.{k}": v for k, v in old_style.items()}, strict=True)
    make().load_state_dict(src.state_dict(), strict=True)


def test_autocast_dtype_helper():
    assert router_module.autocast_dtype(torch.device("cpu")) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router_module.autocast_dtype(torch.device("cpu")) == torch.bfloat16
