"""The PEER layer: exact retrieval, forward and gradients of every backend vs a float64 reference,
memory bound of the lean backend, configuration errors."""

import math

import pytest
import torch

from tests.references import naive_float64, saved_bytes
from torchpeer.layers.peer import PEER
from torchpeer.ops import product_key_topk_reference as brute_force_topk


def full_keys(m: PEER) -> torch.Tensor:
    """(key_sets, N, d_key): key i = a*n + b is [sub_keys[s,0,a]; sub_keys[s,1,b]]."""
    S, _, n, half = m.sub_keys.shape
    rows = []
    for a in range(n):
        for b in range(n):
            rows.append(torch.cat([m.sub_keys[:, 0, a], m.sub_keys[:, 1, b]], dim=-1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize(
    "n_experts,top_k,heads,d_key,shared",
    [(16, 4, 1, 8, True), (64, 8, 4, 16, True), (64, 3, 2, 6, False), (100, 10, 3, 4, True), (49, 7, 2, 10, False)],
)
def test_retrieve_is_exact_topk_over_all_keys(n_experts, top_k, heads, d_key, shared):
    torch.manual_seed(n_experts + top_k)
    m = PEER(24, n_experts=n_experts, heads=heads, top_k=top_k, d_key=d_key, shared_keys=shared).double().eval()
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    scores, idx = m.retrieve(x)
    assert scores.shape == idx.shape == (3, 7, heads, top_k)
    q = m.query(x).reshape(-1, heads, d_key)
    keys = full_keys(m)  # (S, N, d_key)
    keys = keys.expand(heads, -1, -1) if shared else keys
    brute = torch.einsum("thd,hnd->thn", q, keys)
    ref_scores, ref_idx = brute.topk(top_k, dim=-1)
    assert torch.equal(idx.reshape(-1, heads, top_k), ref_idx)
    torch.testing.assert_close(scores.reshape(-1, heads, top_k), ref_scores)
    assert int(idx.min()) >= 0 and int(idx.max()) < n_experts


def reference_forward(m: PEER, x: torch.Tensor) -> torch.Tensor:
    """float64 PEER forward from the public pieces: query -> brute-force top-k -> gates -> naive mix."""
    q = m.query(x.reshape(-1, m.d_model))
    scores, idx = brute_force_topk(q, m.sub_keys, m.top_k)
    return naive_float64(x.reshape(-1, m.d_model), m.down, m.up, idx, m.gates(scores), m.activation).view(x.shape)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(activation="gelu", gate="softmax", query_norm="batch", shared_keys=True),
        dict(activation="relu", gate="sigmoid", query_norm="layer", shared_keys=False),
        dict(activation="gelu", gate="sigmoid", query_norm="none", shared_keys=True),
        dict(activation="gelu", gate="softmax", query_norm="ema", shared_keys=True),  # the default norm
    ],
)
def test_forward_and_all_gradients_match_float64_reference(backend, cfg):
    torch.manual_seed(0)
    m = PEER(16, n_experts=81, heads=3, top_k=5, d_key=8, backend=backend, **cfg).double()
    ref_m = PEER(16, n_experts=81, heads=3, top_k=5, d_key=8, backend=backend, **cfg).double()
    ref_m.load_state_dict(m.state_dict())
    x = torch.randn(2, 11, 16, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = m(x)
    y_ref = reference_forward(ref_m, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    for (name, p), p_ref in zip(m.named_parameters(), ref_m.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_layer_lean_backend_memory_bound():
    """Everything autograd keeps for backward of the whole layer grows with T*H*K, not T*H*K*d."""
    T, d, H, K = 512, 128, 4, 8
    x = torch.randn(T, d, requires_grad=True)
    sizes = {}
    for backend in ("torch", "reference"):
        torch.manual_seed(0)
        m = PEER(d, n_experts=32**2, heads=H, top_k=K, d_key=16, backend=backend)
        sizes[backend] = saved_bytes(lambda m=m: m(x), list(m.parameters()))
    gathered = T * H * K * d * 4
    assert sizes["reference"] >= gathered
    # x (T*d) + queries and norm activations (a few T*H*d_key) + (T,H,K) indices/gates/scores
    assert sizes["torch"] <= 4 * T * d * 4 + 4 * T * H * 16 * 4 + 6 * T * H * K * 8
    assert sizes["torch"] < gathered / 4


def test_drop_in_shapes_and_autocast():
    m = PEER(32, n_experts=16**2, heads=2, top_k=4, d_key=8)
    x = torch.randn(2, 3, 5, 32)
    assert m(x).shape == x.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.down.grad.dtype == torch.float32


@pytest.mark.parametrize("query_norm", ["ema", "batch", "ema_white", "layer", "l2", "none"])
def test_a_batch_of_no_tokens_gives_an_empty_output(query_norm):
    """A drop-in FFW takes (0, seq, d_model) like nn.Linear does (the default "ema" and "batch" norms
    raised reshape's "0 elements into shape [0, -1]" error), and an empty training batch leaves the
    running statistics finite."""
    m = PEER(32, n_experts=16**2, heads=2, top_k=4, d_key=8, query_norm=query_norm)
    for training in (True, False):
        m.train(training)
        x = torch.randn(0, 5, 32, requires_grad=True)
        y = m(x)
        assert y.shape == (0, 5, 32)
        y.sum().backward()
        assert x.grad.shape == x.shape
    assert all(torch.isfinite(b.float()).all() for b in m.buffers())
    assert torch.isfinite(m.train()(torch.randn(2, 3, 32))).all()


@pytest.mark.parametrize("query_norm", ["ema", "batch", "ema_white"])
def test_retrieve_and_query_do_not_update_the_norm_statistics(query_norm):
    """In training mode retrieve() / query() (the README's inspection calls) updated the query norm's
    running statistics like a training step, so the next forward saw other statistics than without
    the look (and picked other experts). Now they leave the layer as it was, still differentiable."""
    torch.manual_seed(0)
    m = PEER(32, n_experts=16**2, heads=2, top_k=4, d_key=8, query_norm=query_norm)
    twin = PEER(32, n_experts=16**2, heads=2, top_k=4, d_key=8, query_norm=query_norm)
    twin.load_state_dict(m.state_dict())
    x = torch.randn(3, 7, 32)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    scores, idx = m.retrieve(x)
    again = m.retrieve(x)
    q = m.query(x)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert torch.equal(idx, again[1]) and torch.equal(scores, again[0])
    (scores.sum() + q.sum()).backward()
    assert m.router.query_proj.weight.grad.abs().sum() > 0
    torch.testing.assert_close(m(x), twin(x), rtol=0, atol=0)  # the forward counts, once
    assert all(torch.equal(a, b) for a, b in zip(m.buffers(), twin.buffers()))


def test_init_output_scale():
    """The docstring's init claims: up ~ N(0, 1/d) by default (output scaled by exactly that std), and
    up_init_std = (h*G)**-0.5 (the earlier init) gives an output std within a small factor of a
    dense 4d FFW's."""
    d, h, k = 64, 4, 8
    x = torch.randn(4096, d)
    torch.manual_seed(0)
    m = PEER(d, n_experts=64**2, heads=h, top_k=k, d_key=16).eval()
    assert m.up_init_std == 1 / math.sqrt(d)
    torch.testing.assert_close(m.up.std(), torch.tensor(1 / math.sqrt(d)), rtol=0.01, atol=0)
    torch.manual_seed(0)
    old = PEER(d, n_experts=64**2, heads=h, top_k=k, d_key=16, up_init_std=(h / k) ** -0.5).eval()
    lin = torch.nn.Linear
    dense = torch.nn.Sequential(lin(d, 4 * d, bias=False), torch.nn.GELU(), lin(4 * d, d, bias=False))
    torch.nn.init.normal_(dense[0].weight, std=1 / math.sqrt(d))
    torch.nn.init.normal_(dense[2].weight, std=1 / math.sqrt(4 * d))
    with torch.no_grad():
        y, y_old = m(x), old(x)
        assert 0.5 < y_old.std() / dense(x).std() < 2.0
        torch.testing.assert_close(y, y_old * (m.up_init_std / old.up_init_std), rtol=1e-4, atol=1e-6)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="up_init_std must be a positive number"):
            PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, up_init_std=bad)


def test_paper_defaults_and_public_api():
    m = PEER(8, n_experts=32**2)  # paper defaults except N (to stay small) and the causal-safe query norm
    assert (m.heads, m.top_k, m.d_key, m.query_norm, m.gate, m.shared_keys) == (8, 16, 128, "ema", "softmax", True)
    assert m.sub_keys.shape == (1, 2, 32, 64)
    assert m.down.shape == m.up.shape == (32**2, 8)
    assert PEER.__init__.__defaults__[0] == 1024**2
    assert PEER(8, n_experts=16, heads=3, top_k=2, d_key=4, shared_keys=False).sub_keys.shape == (3, 2, 4, 2)


def test_cost_hand_computed():
    m = PEER(64, n_experts=32**2, heads=4, top_k=8, d_key=16, query_norm="batch")
    c = m.cost()
    q_params = 64 * 4 * 16 + 2 * 4 * 16  # projection + BatchNorm affine
    assert c.total_params == q_params + 2 * 32 * 8 + 2 * 1024 * 64
    assert c.active_params == q_params + 2 * 32 * 8 + 4 * 8 * 2 * 64
    # query 2*64*64 + scores 4 heads * 2 * 32 * 16 + experts 4*8*(2*64 + 2*64)
    assert c.forward_flops == 8192 + 4096 + 8192
    assert c.train_flops == 3 * c.forward_flops


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n_experts=1000), "perfect square"),
        (dict(n_experts=64, top_k=9), "top_k=9"),
        (dict(d_key=7), "even"),
        (dict(heads=0), "heads"),
        (dict(activation="tanh"), "activation"),
        (dict(gate="relu"), "gate"),
        (dict(query_norm="group"), "query_norm"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_configs(kwargs, match):
    base = dict(d_model=8, n_experts=64, heads=2, top_k=4, d_key=8)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PEER(**base)


def test_wrong_input_dimension():
    m = PEER(8, n_experts=64, heads=2, top_k=4, d_key=8)
    with pytest.raises(ValueError, match="d_model=8"):
        m(torch.randn(3, 9))
    with pytest.raises(TypeError, match="torch.Tensor"):
        m([1.0] * 8)


def test_input_dtype_other_than_the_parameters_is_one_clear_error():
    """bf16 input to an fp32 layer (no autocast) or integer input: one TypeError naming both dtypes
    and the fixes, not matmul's error from inside torch; under autocast, or once the layer is cast,
    the same input runs."""
    from torchpeer import PKM

    m = PEER(8, n_experts=64, heads=2, top_k=4, d_key=8)
    x = torch.randn(3, 8)
    wrong = r"PEER: the input is torch.bfloat16 but the layer's parameters are torch.float32"
    with pytest.raises(TypeError, match=wrong):
        m(x.bfloat16())
    with pytest.raises(TypeError, match="floating-point input"):
        m(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="PKM: the input is torch.float64"):
        PKM(8, n_keys=8, heads=2, top_k=4, d_key=8)(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x.bfloat16()).shape == (3, 8)
    y64 = m.double()(x.double())
    assert y64.dtype == torch.float64 and torch.isfinite(y64).all()


def test_triton_backend_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    m = PEER(8, n_experts=64, heads=2, top_k=4, d_key=8, backend="triton")
    with pytest.raises(ValueError, match="backend='torch'"):
        m(torch.randn(3, 8))


def test_table_update_hook_replaces_the_mixing_op():
    torch.manual_seed(3)
    m = PEER(8, n_experts=16, heads=2, top_k=2, d_key=4).eval()
    x = torch.randn(5, 8)
    calls = []

    def table_update(flat, down, up, indices, gates, activation):
        calls.append((indices.shape, activation))
        return torch.zeros_like(flat)

    y = m(x)
    m.table_update = table_update
    assert m(x).abs().sum() == 0 and calls == [((5, 2, 2), "gelu")]
    assert "table_update" not in m.state_dict()
    m.table_update = None
    torch.testing.assert_close(m(x), y)
