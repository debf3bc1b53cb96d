"""PEER's read-outs beyond act(u.x) v (readout "linear", "glu", "gated"): the ops against a float64 loop
formula, the layer against a float64 reference built from public pieces (forward and every gradient),
the Triton path of "gated" under TRITON_INTERPRET=1, the torch fallback of "linear"/"glu", costs."""

import pytest
import torch
import torch.nn.functional as F

from tests.references import assert_backward_matches
from torchpeer.layers.peer import PEER
from torchpeer.ops import product_key_topk_reference
from torchpeer.ops.expert_mixing.reference import expert_mix_readout_reference
from torchpeer.ops.expert_mixing.torch_impl import expert_mix_readout_torch


def loop_float64(x, down, up, lin, idx, gates, readout, activation):
    """The read-outs as a loop over (head, k) in float64, written independently of the implementations."""
    act = F.gelu if activation == "gelu" else torch.relu
    x, down, up, gates = (t.double() for t in (x, down, up, gates))
    out = torch.zeros_like(x)
    for h in range(idx.shape[1]):
        for k in range(idx.shape[2]):
            i = idx[:, h, k]
            pre = (x * down[i]).sum(-1, keepdim=True)
            if readout == "paper":
                c = act(pre)
            elif readout == "linear":
                c = pre
            else:  # glu
                c = act(pre) * (x * lin.double()[i]).sum(-1, keepdim=True)
            out = out + gates[:, h, k, None] * c * up[i]
    return out


def _inputs(T=11, d=6, N=20, H=2, K=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    down, up, lin = (torch.randn(N, d, generator=g, dtype=dtype) for _ in range(3))
    idx = torch.randint(0, N, (T, H, K), generator=g)
    gates = torch.rand(T, H, K, generator=g, dtype=dtype)
    return x, down, up, lin, idx, gates


@pytest.mark.parametrize("readout,activation", [("linear", "gelu"), ("glu", "gelu"), ("glu", "relu")])
def test_readout_ops_match_the_loop_formula_forward_and_backward(readout, activation):
    x, down, up, lin, idx, gates = _inputs()
    lin = lin if readout == "glu" else None
    ref = expert_mix_readout_reference(x, down, up, idx, gates, readout, activation, lin=lin)
    torch.testing.assert_close(ref, loop_float64(x, down, up, lin, idx, gates, readout, activation))

    leaves = [t.clone().requires_grad_() for t in (x, down, up, gates)]
    lin_leaf = lin.clone().requires_grad_() if lin is not None else None
    y = expert_mix_readout_torch(*leaves[:3], idx, leaves[3], readout, activation, lin=lin_leaf, chunk=3)  # 4 chunks
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    leaves_ref = [t.clone().requires_grad_() for t in (x, down, up, gates)]
    lin_ref = lin.clone().requires_grad_() if lin is not None else None
    y_ref = loop_float64(*leaves_ref[:3], lin_ref, idx, leaves_ref[3], readout, activation)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    pairs = list(zip(["x", "down", "up", "gates"], leaves, leaves_ref))
    if lin is not None:
        pairs.append(("lin", lin_leaf, lin_ref))
    for name, a, b in pairs:
        assert a.grad is not None and a.grad.abs().sum() > 0, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_readout_ops_float32_and_wide_tables():
    """fp32 x against the float64 spec; bf16 x with fp32 master tables keeps fp32 table gradients."""
    x, down, up, lin, idx, gates = _inputs(dtype=torch.float32, seed=1)
    y = expert_mix_readout_torch(x, down, up, idx, gates, "glu", lin=lin)
    ref = loop_float64(x, down, up, lin, idx, gates, "glu", "gelu")
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    tables = [t.clone().requires_grad_() for t in (down, up, lin)]
    y16 = expert_mix_readout_torch(x.bfloat16(), tables[0], tables[1], idx, gates, "glu", lin=tables[2])
    assert y16.dtype == torch.bfloat16
    y16.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 and t.grad.abs().sum() > 0 for t in tables)


def test_readout_op_errors():
    x, down, up, lin, idx, gates = _inputs()
    with pytest.raises(ValueError, match="readout must be one of"):
        expert_mix_readout_torch(x, down, up, idx, gates, "paper")
    with pytest.raises(ValueError, match="needs lin"):
        expert_mix_readout_torch(x, down, up, idx, gates, "glu")
    with pytest.raises(ValueError, match="needs lin"):
        expert_mix_readout_torch(x, down, up, idx, gates, "glu", lin=lin[:, :3])
    with pytest.raises(ValueError, match="takes no lin"):
        expert_mix_readout_torch(x, down, up, idx, gates, "linear", lin=lin)


def layer_reference(m: PEER, x: torch.Tensor) -> torch.Tensor:
    """float64 PEER forward from public pieces: query -> brute-force top-k -> gates -> loop formula (-> gate)."""
    flat = x.reshape(-1, m.d_model)
    scores, idx = product_key_topk_reference(m.query(flat), m.sub_keys, m.top_k)
    lin = m.lin if m.readout == "glu" else None
    mix = "paper" if m.readout == "gated" else m.readout
    y = loop_float64(flat, m.down, m.up, lin, idx, m.gates(scores), mix, m.activation)
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


def test_gated_readout_runs_through_the_triton_kernels():
    pytest.importorskip("triton")  # conftest sets TRITON_INTERPRET=1 without a GPU
    torch.manual_seed(2)
    kw = dict(n_experts=49, heads=2, top_k=3, d_key=8, readout="gated")
    m = PEER(16, backend="triton", **kw)
    assert m.op_backends() == {"product_key_topk": "triton", "expert_mix": "triton"}
    ref = PEER(16, backend="reference", **kw).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(13, 16, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    assert_backward_matches(m, ref, x, x_ref, m(x), layer_reference(ref, x_ref), True)


@pytest.mark.parametrize("readout", ["linear", "glu"])
def test_torch_only_readouts_mix_in_pytorch_and_refuse_triton(readout):
    # No Triton kernel computes these: "auto" mixes in PyTorch wherever retrieval runs (on CUDA:
    # Triton retrieval, torch mixing), and asking for "triton" is an error at construction.
    m = PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, readout=readout)
    assert m.op_backends("cpu") == {"product_key_topk": "torch", "expert_mix": "torch"}
    if m.router.retrieval_backend("cuda") == "triton":  # triton installed: what "auto" picks on a GPU
        assert m.op_backends("cuda") == {"product_key_topk": "triton", "expert_mix": "torch"}
        paper = PEER(8, n_experts=16, heads=1, top_k=2, d_key=4)
        assert paper.op_backends("cuda")["expert_mix"] == "triton"
    with pytest.raises(ValueError, match=f"readout='{readout}' has no Triton kernel"):
        PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, readout=readout, backend="triton")


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
    for readout in ("linear", "glu"):
        m = PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, readout=readout)
        with pytest.raises(ValueError, match="rowwise_adam"):
            m.table_update = lambda *a: None
    ok = PEER(8, n_experts=16, heads=1, top_k=2, d_key=4, readout="gated")
    ok.table_update = fn = lambda *a: None  # the gated read-out mixes with the paper's tables: allowed
    assert ok.table_update is fn
    ok.table_update = None
    assert ok.table_update is None
