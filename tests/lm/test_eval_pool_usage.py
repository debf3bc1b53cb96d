"""Pool usage at evaluation: when PEER layers share one expert pool, ``evaluate`` reports the pool's
union usage % and KL besides each layer's (in "pool_usage", in "routing" under the pool's name, and
as a row of ``format_results``)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from torchpeer.layers import PEERConfig
from torchpeer.lm.config import ModelConfig
from torchpeer.lm.evaluate import evaluate, format_results, format_routing
from torchpeer.lm.model import TransformerLM

N, D, H, K, SEQ = 64, 32, 2, 4, 16


def shared_lm(shared: bool = True) -> TransformerLM:
    torch.manual_seed(0)
    peer = PEERConfig(n_experts=N, heads=H, top_k=K, d_key=16, query_norm="layer", shared_pool=shared)
    cfg = ModelConfig(d_model=D, n_layers=3, n_heads=2, seq_len=SEQ, vocab_size=50, placement=[0, 2], peer=peer)
    return TransformerLM(cfg)


def force_routing(router, first: int, count: int) -> None:
    """Replace the router's retrieval by a constructed one: every call selects the experts
    first .. first + count - 1 round-robin (each equally often when T*H*K is a multiple of count),
    all with equal scores (so equal softmax gates)."""

    def hook(mod, inp, out):
        q, scores, _ = out
        T = q.shape[0]
        idx = first + torch.arange(T * H * K).remainder(count).view(T, H, K)
        return q, torch.zeros_like(scores), idx

    router.register_forward_hook(hook)


def token_file(n_tokens: int) -> SimpleNamespace:
    return SimpleNamespace(tokens=np.arange(n_tokens, dtype=np.int64) % 50, n_bytes=4 * n_tokens)


def test_disjoint_halves_give_full_pool_usage_and_half_per_layer():
    model = shared_lm()
    force_routing(model.blocks[0].ffw.router, 0, N // 2)  # layer 0: experts 0..31
    force_routing(model.blocks[2].ffw.router, N // 2, N // 2)  # layer 2: experts 32..63
    r = evaluate(model, token_file(3 * SEQ + 1), batch_size=1, seq_len=SEQ)  # 3 batches of 16 tokens
    assert r["complete"]
    for layer in ("blocks.0.ffw", "blocks.2.ffw"):
        assert r["usage"][layer]["usage_pct"] == pytest.approx(50.0)
        assert r["usage"][layer]["kl"] == pytest.approx(math.log(2), abs=1e-12)  # uniform over half the pool
    assert set(r["usage"]) == {"blocks.0.ffw", "blocks.2.ffw"}  # "usage" stays per layer
    pool = r["pool_usage"]["ffw_shared"]
    assert pool["usage_pct"] == pytest.approx(100.0) and pool["kl"] == pytest.approx(0.0, abs=1e-12)
    assert pool["layers"] == 2
    assert r["routing"]["ffw_shared"] == pool  # what results.jsonl keeps (it copies "routing")
    table = format_results({"v": r})
    row = [line for line in table.splitlines() if "ffw_shared" in line]
    assert len(row) == 1 and "(pool of 2 layers)" in row[0] and "100.00" in row[0] and "0.0000" in row[0]
    assert "ffw_shared" not in format_routing({"v": r})  # usage % and KL only: the table above has them


def test_overlapping_layers_and_uneven_mass():
    # both layers on experts 0..31, but layer 2 on 0..15 only: union usage 50 %, and the union's KL is
    # that of the summed mass (layer 0 spreads 1/32 per expert, layer 2 1/16 on the first 16)
    model = shared_lm()
    force_routing(model.blocks[0].ffw.router, 0, 32)
    force_routing(model.blocks[2].ffw.router, 0, 16)
    r = evaluate(model, token_file(2 * SEQ + 1), batch_size=2, seq_len=SEQ)
    assert r["usage"]["blocks.2.ffw"]["usage_pct"] == pytest.approx(25.0)
    pool = r["pool_usage"]["ffw_shared"]
    assert pool["usage_pct"] == pytest.approx(50.0)
    z = torch.cat([torch.full((16,), 1 / 32 + 1 / 16), torch.full((16,), 1 / 32)]).double() / 2
    assert pool["kl"] == pytest.approx(math.log(N) + (z * z.log()).sum().item(), abs=1e-12)


def test_no_pool_entry_without_a_shared_pool():
    r = evaluate(shared_lm(shared=False), token_file(SEQ + 1), batch_size=1, seq_len=SEQ)
    assert r["pool_usage"] == {} and set(r["routing"]) == {"blocks.0.ffw", "blocks.2.ffw"}
    assert "pool" not in format_results({"v": r})


def test_trainer_summary_and_results_record_carry_the_pool(tmp_path):
    """End to end: two PEER layers on one pool (with normalised sub-keys and a ramped table lr) train,
    the final evaluation reports the pool, and a sweep's results record keeps it (under "routing")."""
    from tests.lm.helpers import write_config, write_corpus
    from torchpeer.lm.config_io import load_config
    from torchpeer.lm.train import train

    write_corpus(tmp_path, train_lines=300, valid_lines=40)
    flags = ["--model.placement", "all", "--model.peer.shared_pool", "true", "--model.peer.key_norm", "l2"]
    flags += ["--train.max_steps", "3", "--train.expert_lr_final", "1e-3", "--train.checkpoint", "false"]
    summary = train(load_config(write_config(tmp_path), flags), str(tmp_path / "run"), progress=False)
    v = summary["valid"]["v"]
    pool = v["pool_usage"]["ffw_shared"]
    assert pool["layers"] == 2 and set(v["usage"]) == {"blocks.0.ffw", "blocks.1.ffw"}
    assert max(u["usage_pct"] for u in v["usage"].values()) <= pool["usage_pct"] <= 100
    results = pytest.importorskip("torchpeer.experiments.results")  # the sweep's optional part
    assert results._eval_entry(v)["routing"]["ffw_shared"] == pool
