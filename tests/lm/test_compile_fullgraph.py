"""The PEER language model compiles end to end with no graph break (issue 19): torch.compile with
fullgraph=True (which fails on any break) over the forward, the loss and the backward of a
TransformerLM whose PEER block runs the Triton kernels (under TRITON_INTERPRET=1 on the CPU: the
custom ops' fake implementations are what the tracer sees, as on a GPU) and the default ema query
norm; the compiled loss and gradients equal the eager ones, and the running statistics advance."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from torchpeer.lm import load_config  # noqa: E402
from torchpeer.lm.model import TransformerLM  # noqa: E402


def tiny_peer_lm(readout: str = "paper", balance_weight: float = 0.0, prior: str = "none") -> TransformerLM:
    cfg = load_config("ptb-tiny")
    m = cfg.model
    m.logit_prior = prior
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.seq_len = 64, 32, 2, 2, 16
    m.peer.n_experts, m.peer.heads, m.peer.top_k, m.peer.d_key, m.peer.backend = 64, 2, 4, 8, "triton"
    m.peer.readout, m.peer.balance_weight, m.peer.balance_stride = readout, balance_weight, 2
    return TransformerLM(m)


# glu: its own mixing ops (triton_glu_op.py), with the plain head; paper: the paper's mixing ops with
# chunk 12: train.loss_chunk_tokens (lm/chunked_loss.py, a custom autograd function and a chunk loop;
# 32 tokens = 12 + 12 + 8) against the eager plain head, and the sub-key balance term of the recommended
# config: its compiled value and gradients (whether it breaks a graph is test_balance.py's check: under
# fullgraph=True torch 2.13 captures even bincount). (A third case, paper with the plain head and no
# term, repeated these two's ops for ~11 s of the suite.) The paper case also carries model.logit_prior
# (the head's bias, random here as a trained prior would be), which the chunked loss adds per chunk.
@pytest.mark.parametrize("readout,chunk,balance,prior", [("glu", 0, 0.0, "none"), ("paper", 12, 0.01, "unigram")])
def test_peer_lm_forward_loss_backward_compile_with_no_graph_break(readout, chunk, balance, prior):
    torch.manual_seed(0)
    eager, compiled = tiny_peer_lm(readout, balance, prior), tiny_peer_lm(readout, balance, prior)
    if prior != "none":
        torch.nn.init.normal_(eager.lm_head.bias)
    compiled.load_state_dict(eager.state_dict())
    assert eager.cfg.peer.query_norm == "ema"  # the shipped default is what is compiled
    idx = torch.randint(0, 64, (2, 16))
    targets = torch.randint(0, 64, (2, 16))

    def step(model, idx, targets, chunk=0):
        _, loss = model(idx, targets, loss_chunk_tokens=chunk)
        aux = model.aux_loss()  # the balance term (None without one), as the trainer adds it
        return loss if aux is None else loss + aux

    fn = torch.compile(step, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the second call runs with the running statistics the first one updated
        loss_e = step(eager, idx, targets)
        loss_c = fn(compiled, idx, targets, chunk)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        loss_e.backward()
        loss_c.backward()
    if prior != "none":
        assert compiled.lm_head.bias.grad is not None and compiled.lm_head.bias.grad.abs().sum() > 0
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        assert (pe.grad is None) == (pc.grad is None), name
        if pe.grad is not None:
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, be), bc in zip(eager.named_buffers(), compiled.buffers()):
        torch.testing.assert_close(bc, be, msg=name)
    assert any("running_mean" in n and b.abs().sum() > 0 for n, b in compiled.named_buffers())


def test_compiled_steps_with_the_fused_rowwise_adam_update_the_tables_once():
    """The fused row-wise Adam updates the tables inside the mixing backward (a mutating custom op):
    under torch.compile (AOTAutograd) that op must run once per step, as in eager mode. Three steps
    from one init: the losses, the tables and the optimizer's moments and step counts agree."""
    from torchpeer.optim.fused_tables import attach_rowwise_adam

    torch.manual_seed(0)
    eager, compiled = tiny_peer_lm(), tiny_peer_lm()
    compiled.load_state_dict(eager.state_dict())
    opt_e = attach_rowwise_adam(eager, lr=1e-2, bf16_tables=True)
    opt_c = attach_rowwise_adam(compiled, lr=1e-2, bf16_tables=True)

    def step(model, idx, targets):
        _, loss = model(idx, targets)
        loss.backward()
        return loss.detach()

    fn = torch.compile(step, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        idx, targets = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
        torch.testing.assert_close(fn(compiled, idx, targets), step(eager, idx, targets), rtol=1e-5, atol=1e-6)
    layers = [(n, m) for n, m in eager.named_modules() if type(m).__name__ == "PEER"]
    assert layers
    for name, layer in layers:
        other = compiled.get_submodule(name)
        torch.testing.assert_close(other.down, layer.down, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other.up, layer.up, rtol=1e-5, atol=1e-6)
        for se, sc in zip(opt_e.states[name], opt_c.states[name]):
            assert torch.equal(sc.steps, se.steps) and int(se.steps.max()) == 2  # one update per step
            torch.testing.assert_close(sc.exp_avg, se.exp_avg, rtol=1e-4, atol=1e-7)
