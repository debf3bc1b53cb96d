"""`torchpeer info` accounting vs hand computations; the FLOP-budget step count."""

import pytest
import torch

from torchpeer.layers import DenseConfig, PEERConfig
from torchpeer.layers.accounting import count_params
from torchpeer.lm.config import ModelConfig, RunConfig, TrainConfig
from torchpeer.lm.info import config_cost, format_cost, model_cost
from torchpeer.lm.model import TransformerLM
from torchpeer.lm.train import plan_steps


def dense_cfg(**kw) -> ModelConfig:
    opts = dict(d_model=16, n_layers=2, n_heads=2, seq_len=8, vocab_size=32, ffw="dense")
    return ModelConfig(dense=DenseConfig(d_hidden=64), **{**opts, **kw})


def test_dense_tiny_by_hand():
    cost = config_cost(dense_cfg())
    d, L, T, V, dh = 16, 2, 8, 32, 64
    block_params = 4 * d * d + 2 * d + 2 * d * dh  # attention, two norms, FFW in/out
    block_fwd = 2 * 4 * d * d + 2 * T * d + 2 * 2 * d * dh  # projections, causal scores, FFW
    assert (block_params, block_fwd) == (3104, 6400)
    blocks = [p for p in cost.parts if p.name.startswith("block")]
    assert [(b.total_params, b.active_params, b.forward_flops) for b in blocks] == [(3104, 3104, 6400)] * L
    assert cost.total_params == V * d + L * block_params + d == 6736  # tied: one embedding matrix
    # active: the unembedding matrix and final norm count, the embedding lookup does not
    assert cost.active_params == L * block_params + d + V * d == 6736
    assert cost.forward_flops == L * block_fwd + 2 * d * V == 13824
    assert cost.train_flops == 3 * 13824 == 41472
    # the attention score term is 6 * n_layers * seq_len * d_model of the training FLOPs
    no_scores = config_cost(dense_cfg(seq_len=1))
    assert cost.train_flops - no_scores.train_flops == 6 * L * (T - 1) * d  # seq_len 8 vs 1


def test_untied_counts_the_head_once_more():
    tied, untied = config_cost(dense_cfg()), config_cost(dense_cfg(tie_embeddings=False))
    assert untied.total_params - tied.total_params == 32 * 16
    assert untied.active_params == tied.active_params and untied.train_flops == tied.train_flops


def test_a_logit_prior_adds_the_heads_bias_and_no_flops():
    """model.logit_prior: vocab more parameters, total and active (the bias is read for every token),
    the same FLOPs; the count agrees with the built model's."""
    plain, prior = config_cost(dense_cfg()), config_cost(dense_cfg(logit_prior="unigram"))
    assert prior.total_params - plain.total_params == 32 == prior.active_params - plain.active_params
    assert prior.train_flops == plain.train_flops
    assert prior.total_params == count_params(TransformerLM(dense_cfg(logit_prior="unigram")))
    assert "logit_prior=unigram" in format_cost(prior, dense_cfg(logit_prior="unigram"))
    assert "logit_prior" not in format_cost(plain, dense_cfg())


def test_peer_block_uses_module_cost_and_meta_matches_real():
    cfg = dense_cfg(ffw="peer", peer=PEERConfig(n_experts=256, heads=2, top_k=4, d_key=8))
    cost = config_cost(cfg)
    real = TransformerLM(cfg)  # built for real: the meta-device count must agree
    assert cost.total_params == count_params(real)
    peer = real.blocks[1].ffw
    pc = peer.cost()
    b1 = cost.parts[2]  # embedding, block 0, block 1
    assert b1.kind == "peer"
    attn_norm = 4 * 16 * 16 + 2 * 16
    assert b1.total_params == attn_norm + pc.total_params
    assert b1.active_params == attn_norm + pc.active_params
    assert b1.forward_flops == 2 * 4 * 16 * 16 + 2 * 8 * 16 + pc.forward_flops
    # PEER's active params by hand: query proj 16*2*8, BN 2*(2*8), sub-keys 2*16*4, 2*4 experts x (u, v)
    assert pc.active_params == 16 * 16 + 2 * 16 + 2 * 16 * 4 + 2 * 4 * 2 * 16
    # its FLOPs: query 2*16*16, sub-key scores 2 heads * 2*8*16, experts 2*4*4*16
    assert pc.forward_flops == 2 * 16 * 16 + 2 * 2 * 8 * 16 + 2 * 4 * 4 * 16


def test_million_expert_config_costs_no_memory():
    cfg = ModelConfig(d_model=1024, n_layers=12, n_heads=8, vocab_size=50000, peer=PEERConfig(), placement="all")
    cost = config_cost(cfg)  # 12 x 2 x 1024**2 x 1024 weights: only possible on the meta device
    assert cost.total_params > 24 * 1024**3
    assert cost.active_params < 0.01 * cost.total_params


def test_model_cost_of_built_model_equals_config_cost():
    torch.manual_seed(0)
    cfg = dense_cfg(ffw="moe", placement="all")
    cfg.moe.n_experts, cfg.moe.d_expert = 4, 16
    assert model_cost(TransformerLM(cfg)).to_dict() == config_cost(cfg).to_dict()


def test_plan_steps_budgets():
    run = RunConfig(model=dense_cfg(), train=TrainConfig(batch_size=4, max_steps=None, max_tokens=320))
    tps = 4 * 8
    assert plan_steps(run, 1000) == 10  # 320 tokens / 32 per step
    run.train.max_steps = 7
    assert plan_steps(run, 1000) == 7  # the first limit reached wins
    run.train.max_steps, run.train.max_tokens, run.train.max_flops = None, None, 5.5 * tps * 1000
    assert plan_steps(run, 1000) == 5  # whole steps inside the FLOP budget
    run.train.max_flops = 10.0
    with pytest.raises(ValueError, match="less than one step"):
        plan_steps(run, 1000)
