"""The shipped candidate config (gpu-peer-multi-small) and the GPU plan of docs/research/beyond_paper.md:
the design is what the log says, every planned run trains with no more FLOPs than its dense twin, and
the log's FLOP table is what `torchpeer info` computes."""

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from torchpeer.layers.expert_pool import ExpertPool
from torchpeer.lm.config_io import apply_overrides, load_config
from torchpeer.lm.info import config_cost

LOG = Path(__file__).resolve().parents[2] / "docs" / "research" / "beyond_paper.md"


def cost_of(name: str, overrides: list[str] = ()):
    cfg = load_config(name)
    cfg.model.vocab_size = cfg.data.vocab_size  # BPE-16k, as the runs resolve it
    apply_overrides(cfg, list(overrides))
    return config_cost(cfg.model)


def test_candidate_config_is_four_peer_blocks_on_one_pool_below_dense_flops():
    cfg = load_config("gpu-peer-multi-small")
    assert cfg.model.sparse_blocks() == [1, 3, 5, 7]
    assert cfg.model.peer.shared_pool and cfg.model.peer.n_experts == 1024**2
    assert cfg.model.peer.readout == "paper" and cfg.model.peer.balance_weight == 0  # the levers are overrides
    dense = load_config("gpu-dense-small").model
    for f in ("d_model", "n_layers", "n_heads", "seq_len"):  # the dense twin's shape
        assert getattr(cfg.model, f) == getattr(dense, f), f
    multi, twin = cost_of("gpu-peer-multi-small"), cost_of("gpu-dense-small")
    assert multi.train_flops < twin.train_flops
    pool = [p for p in multi.parts if p.name == "ffw_shared"]
    assert len(pool) == 1 and pool[0].kind == ExpertPool.__name__ and pool[0].total_params == 2 * 1024**2 * 512


def test_shipped_sweep_plans_every_run_at_or_below_the_dense_twins_flops(tmp_path):
    """The GPU plan of the log is the shipped spec `beyond-paper` (torchpeer/experiments/specs/)."""
    exp_spec = pytest.importorskip("torchpeer.experiments.spec")
    exp_plan = pytest.importorskip("torchpeer.experiments.plan")
    spec = exp_spec.load_spec("beyond-paper")
    runs = exp_plan.plan_sweep(spec, str(tmp_path))
    assert len(runs) == 72  # 36 designs (dense, the paper's PEER, 24 new, 5 lr and 5 warm-up controls) x 2 seeds
    assert len(runs[0].cfg.data.valid) == 11  # the corpus valid set and each of the 10 sources
    by_seed: dict[int, dict[str, object]] = {}
    for r in runs:
        by_seed.setdefault(r.cfg.train.seed, {})[r.variant.split("-", 1)[1]] = r
    assert sorted(by_seed) == [0, 1] and by_seed[0].keys() == by_seed[1].keys()
    for r in runs:  # one evaluation after 30M tokens (the usage / KL criterion) besides the final one
        t = r.cfg.train
        assert t.eval_interval * t.batch_size * t.grad_accum * r.cfg.model.seq_len == pytest.approx(30e6, rel=1e-3)
    for seed, designs in by_seed.items():
        dense = designs["dense"]
        assert dense.tokens >= 60_000_000
        for name, r in designs.items():
            assert r.train_flops <= dense.train_flops, (seed, name)
            if name != "gated":  # gated costs more per token: it gets the dense run's FLOP budget instead
                assert r.tokens == dense.tokens, (seed, name)
        assert designs["gated"].tokens < dense.tokens
        assert designs["key-norm"].cfg.model.peer.key_norm == "l2"
        ramp = designs["table-lr-decay"].cfg.train
        assert (ramp.expert_lr, ramp.expert_lr_final) == (3e-3, 1e-3)
        single = designs["single-balance05"].cfg  # the paper's layer + the balance term at 0.05, paired with `paper`
        paper = designs["paper"].cfg
        assert (single.model.sparse_blocks(), single.model.peer.shared_pool) == (paper.model.sparse_blocks(), False)
        assert (single.model.peer.balance_weight, single.model.peer.balance_stride) == (0.05, 8)
        assert (single.train.lr, single.train.warmup_steps, single.model.peer.query_norm) == (
            paper.train.lr,
            paper.train.warmup_steps,
            paper.model.peer.query_norm,
        )
        wide = designs["top-k-32"].cfg.model.peer
        assert (wide.top_k, wide.heads, wide.n_experts, wide.shared_pool) == (32, 8, 1024**2, True)
        for name, n in (("multi-separate-2m", 724**2), ("multi-separate-4m", 1024**2)):  # larger separate pools
            model = designs[name].cfg.model
            assert (model.peer.n_experts, model.peer.shared_pool, model.sparse_blocks()) == (n, False, [1, 3, 5, 7])
        assert not designs["per-head-keys"].cfg.model.peer.shared_keys
        both = designs["balance-values-lr"].cfg
        assert (both.model.peer.balance_weight, both.train.expert_lr) == (0.01, 3e-3)
        decay = designs["balance-values-lr-decay"].cfg
        t = decay.train
        assert (decay.model.peer.balance_weight, t.expert_lr, t.expert_weight_decay) == (0.01, 3e-3, 1)
        assert decay.train.expert_optimizer == "adamw" and both.train.expert_weight_decay == 0  # dense decay, every row
        for name, blocks in (("hybrid-4", [1, 3, 5, 7]), ("hybrid-all", list(range(8)))):  # dense branch, dense FLOPs
            model = designs[name].cfg.model
            assert (model.peer.dense_hidden, model.sparse_blocks()) == (384, blocks)
            assert designs[name].train_flops == dense.train_flops
        single = designs["single-tuned"].cfg  # the winner's levers on the paper's layer
        assert single.model.sparse_blocks() == [4] and not single.model.peer.shared_pool
        assert (single.model.peer.balance_weight, single.train.expert_lr, single.train.expert_weight_decay) == (
            0.01, 3e-3, 1.0
        )  # fmt: skip
        for name, optimizer in (("tuned-rowwise", "rowwise_adam_bf16"), ("tuned-elementwise", "elementwise_adam_bf16")):
            fast = designs[name].cfg  # the winner with a fused table optimizer, nothing else changed
            assert fast.train.expert_optimizer == optimizer and fast.model == decay.model
            assert dataclasses.replace(fast.train, expert_optimizer="adamw") == decay.train
        assert dense.cfg.train.lr == 1e-3
        # the lr controls: only the lr moves
        for name, lr in (("dense-lr5e-4", 5e-4), ("dense-lr2e-3", 2e-3), ("dense-lr4e-3", 4e-3)):
            control = designs[name]
            assert control.cfg.model == dense.cfg.model and control.tokens == dense.tokens
            assert control.cfg.train.lr == lr and dataclasses.replace(control.cfg.train, lr=1e-3) == dense.cfg.train
        for name, lr in (("tuned-lr2e-3", 2e-3), ("tuned-lr4e-3", 4e-3)):  # the winner, its base lr moved
            faster = designs[name].cfg
            assert faster.model == decay.model and faster.train.lr == lr and faster.train.expert_lr == 3e-3
            assert dataclasses.replace(faster.train, lr=1e-3) == decay.train
        # the warm-up controls: 15 % of the steps (their warmup_frac; the rest 2 %), nothing else moved
        # but the winner's logging of each window's usage (train.track_usage)
        assert dense.cfg.train.warmup_steps == 37 and dense.steps == 1832
        twins = {"wu15-dense": "dense", "wu15-dense-lr2e-3": "dense-lr2e-3", "wu15-dense-lr4e-3": "dense-lr4e-3"}
        twins["wu15-tuned"] = "balance-values-lr-decay"  # the winner's design
        for name, twin_name in twins.items():
            control, twin = designs[name], designs[twin_name]
            assert control.cfg.train.warmup_steps == 275 and control.tokens == twin.tokens
            assert control.cfg.model == twin.cfg.model
            assert control.cfg.train.track_usage == (name == "wu15-tuned")  # the winner's pair logs window usage
            assert dataclasses.replace(control.cfg.train, warmup_steps=37, track_usage=False) == twin.cfg.train
        paper = designs["paper"].cfg.model
        assert paper.sparse_blocks() == [4] and not paper.peer.shared_pool and paper.peer.n_experts == 1024**2


def test_the_winner_with_a_fused_table_optimizer_builds_and_steps(tmp_path):
    """The winner's fused designs build as the trainer builds them (shrunk copies of the planned configs):
    the table optimizer takes the shared pool (one state, under ffw_shared) and a step updates it."""
    pytest.importorskip("triton")
    exp_spec = pytest.importorskip("torchpeer.experiments.spec")
    exp_plan = pytest.importorskip("torchpeer.experiments.plan")
    import torch

    from torchpeer.lm.config import FUSED_EXPERT_OPTIMIZERS
    from torchpeer.lm.model import TransformerLM
    from torchpeer.optim import attach_rowwise_adam

    runs = {r.variant: r.cfg for r in exp_plan.plan_sweep(exp_spec.load_spec("beyond-paper"), str(tmp_path))}
    for design, kind in (("tuned-rowwise", 1), ("tuned-elementwise", 2)):  # exp_avg_sq per row / per element
        m, t = runs[f"seed=0-{design}"].model, runs[f"seed=0-{design}"].train
        m.vocab_size, m.d_model, m.n_heads, m.seq_len = 64, 32, 2, 8
        m.peer.n_experts, m.peer.heads, m.peer.top_k, m.peer.d_key = 64, 2, 4, 8
        torch.manual_seed(0)
        model = TransformerLM(m)
        opt = attach_rowwise_adam(model, t.table_lr, (t.beta1, t.beta2), t.eps, t.expert_weight_decay,
                                  **FUSED_EXPERT_OPTIMIZERS[t.expert_optimizer])  # fmt: skip
        assert list(opt.states) == ["ffw_shared"] and m.peer.shared_pool and m.sparse_blocks() == [1, 3, 5, 7]
        state = opt.states["ffw_shared"][0]
        before = state.master.clone()
        idx = torch.randint(0, 64, (1, 8))
        _, loss = model(idx, idx)
        (loss + model.aux_loss()).backward()
        opt.step()
        assert not torch.equal(state.master, before) and state.exp_avg_sq.dim() == kind, design


def test_logged_flop_table_is_what_torchpeer_info_computes():
    rows = re.findall(r"^\| [^|]+ \| (`[^`]*`|-)[^|]*\| ([\d,.]+)M \| [\d.]+M \| ([\d,]+) \| ([\d.]+) \|$",
                      LOG.read_text(), flags=re.M)  # fmt: skip
    assert len(rows) == 15
    dense = cost_of("gpu-dense-small").train_flops
    for overrides, params, flops, ratio in rows:
        args = [] if overrides == "-" else shlex.split(overrides.strip("`"))
        cost = cost_of("gpu-peer-multi-small", args)
        assert cost.train_flops == int(flops.replace(",", "")), overrides
        assert f"{cost.total_params / 1e6:,.1f}" == params, overrides
        assert f"{cost.train_flops / dense:.3f}" == ratio, overrides


def test_shipped_winner_config_is_the_measured_design_of_the_spec(tmp_path):
    """gpu-peer-multi-tuned-small is the spec's `balance-values-lr-decay` run, field for field in what the
    model and its training see (the eval sets, paths and checkpointing aside), so README's numbers are its."""
    exp_spec = pytest.importorskip("torchpeer.experiments.spec")
    exp_plan = pytest.importorskip("torchpeer.experiments.plan")
    runs = exp_plan.plan_sweep(exp_spec.load_spec("beyond-paper"), str(tmp_path))
    measured = next(r.cfg for r in runs if r.variant == "seed=0-balance-values-lr-decay")
    shipped = load_config("gpu-peer-multi-tuned-small")
    assert shipped.model == measured.model  # vocab_size unresolved in both: the run sets it from the tokenizer
    kept = ("checkpoint", "ckpt_interval", "keep_checkpoints", "eval_batches", "tensorboard", "device")
    for f in dataclasses.fields(shipped.train):
        if f.name not in kept:
            assert getattr(shipped.train, f.name) == getattr(measured.train, f.name), f.name
    assert cost_of("gpu-peer-multi-tuned-small").train_flops < cost_of("gpu-dense-small").train_flops
