"""PEERConfig.dense_hidden: a narrow dense FFW beside the experts (y = PEER(x) + W2 gelu(W1 x)).

The forward against a float64 formula written here (brute-force retrieval, the loop mixing formula
and the dense branch by hand), every gradient against a float64 twin, the cost arithmetic, the
LM-level FLOP count, and the errors for bad widths and for column sharding."""

import copy

import pytest
import torch

from tests.references import assert_backward_matches, brute_force_topk, naive_float64
from torchpeer.layers import PEERConfig
from torchpeer.layers.peer import PEER
from torchpeer.lm.config import ModelConfig
from torchpeer.lm.model import TransformerLM

D, N = 16, 8**2


def reference64(m: PEER, x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, m.d_model).double()
    scores, idx = brute_force_topk(m.query(flat.to(x.dtype)).double(), m.sub_keys.double(), m.top_k)
    experts = naive_float64(flat, m.down, m.up, idx, m.gates(scores), m.activation)
    w1, w2 = m.dense.fc_in.weight.double(), m.dense.fc_out.weight.double()
    branch = torch.nn.functional.gelu(flat @ w1.T) @ w2.T
    return (experts + branch).view(x.shape)


def layer(**kw) -> PEER:
    torch.manual_seed(0)
    kw = {"heads": 2, "top_k": 3, "d_key": 8, "query_norm": "layer", "backend": "torch", **kw}
    return PEER(D, n_experts=N, dense_hidden=kw.pop("dense_hidden", 12), **kw)


def test_forward_is_experts_plus_the_dense_branch_in_float64():
    m = layer().eval()
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        y = m(x)
    torch.testing.assert_close(y.double(), reference64(m, x), rtol=1e-4, atol=1e-5)
    # and it is exactly the paper's layer (same state) plus the branch
    paper = PEER(D, n_experts=N, heads=2, top_k=3, d_key=8, query_norm="layer", backend="torch").eval()
    paper.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("dense.")})
    with torch.no_grad():
        torch.testing.assert_close(y, paper(x) + m.dense(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_every_gradient_against_a_float64_twin(backend):
    m = layer(backend=backend).train()
    ref = copy.deepcopy(m).double()
    x = torch.randn(4, 6, D, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    assert_backward_matches(m, ref, x, x_ref, m(x), ref(x_ref), rtol=1e-4, atol=1e-5)
    assert m.dense.fc_in.weight.grad.abs().sum() > 0 and m.dense.fc_out.weight.grad.abs().sum() > 0


def test_cost_adds_the_branch_and_zero_is_the_paper_layer():
    with_branch, paper = layer(dense_hidden=12), layer(dense_hidden=0)
    assert paper.dense is None and "dense_hidden" not in paper.beyond_paper_options()
    assert with_branch.beyond_paper_options() == {"dense_hidden": 12}
    a, b = with_branch.cost(), paper.cost()
    assert a.forward_flops - b.forward_flops == 2 * 2 * D * 12
    assert a.active_params - b.active_params == 2 * D * 12
    assert a.total_params - b.total_params == 2 * D * 12
    assert "dense_hidden=12" in repr(with_branch)


def test_lm_counts_the_branch_in_every_peer_block():
    base = dict(vocab_size=64, d_model=D, n_layers=2, n_heads=2, seq_len=8, ffw="peer", placement="all")
    peer = dict(n_experts=N, heads=2, top_k=3, d_key=8, backend="torch")
    plain = TransformerLM(ModelConfig(**base, peer=PEERConfig(**peer)))
    hybrid = TransformerLM(ModelConfig(**base, peer=PEERConfig(**peer, dense_hidden=12)))
    count = lambda lm: sum(p.numel() for p in lm.parameters())  # noqa: E731
    assert count(hybrid) - count(plain) == 2 * (2 * D * 12)
    ids = torch.randint(0, 64, (2, 8))
    _, loss = hybrid(ids, targets=ids)
    loss.backward()
    for block in hybrid.blocks:
        assert block.ffw.dense.fc_in.weight.grad is not None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_bad_widths_are_one_clear_error(bad):
    with pytest.raises(ValueError, match="dense_hidden must be 0"):
        layer(dense_hidden=bad)


def test_column_sharding_refuses_the_branch():
    m = layer()
    with pytest.raises(ValueError, match="dense_hidden"):
        m.column_shard = object()
