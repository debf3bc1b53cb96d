"""Training: loss goes down, the run folder, bits per byte, grad accumulation and FLOP budgets; the
Trainer's parts (build / train_step / evaluate / checkpoint), callbacks, the parallel-plan seam,
generic aux losses and the backend record."""

import json
import math
import os

import pytest
import torch

from tests.lm.helpers import evals, losses, records, write_config, write_corpus
from torchpeer.lm import Callback, SingleProcessPlan, Trainer
from torchpeer.lm.checkpoint import list_checkpoints, load_model_from_checkpoint
from torchpeer.lm.config_io import load_config
from torchpeer.lm.train import train


def test_training_decreases_loss_and_writes_run(trained):
    root, cfg, run = trained
    ls = losses(run)
    assert [s for s, _ in ls] == list(range(1, 61))
    first, last = sum(v for _, v in ls[:5]) / 5, sum(v for _, v in ls[-5:]) / 5
    assert first > 5.0 and last < first - 2.0  # from ~ln(257) to far below it
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert summary["steps"] == 60 and summary["tokens"] == 60 * 8 * 32
    v = summary["valid"]["v"]
    assert v["complete"] and v["ppl"] == pytest.approx(math.exp(v["loss"]), rel=1e-12)
    assert set(v["usage"]) == {"blocks.1.ffw"} and 0 < v["usage"]["blocks.1.ffw"]["usage_pct"] <= 100
    # keep_checkpoints = 2: only the two newest remain, no temporaries
    assert [os.path.basename(p) for p in list_checkpoints(run)] == ["step_00000050", "step_00000060"]
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_00000050", "step_00000060"]
    assert json.load(open(os.path.join(run, "config.json")))["model"]["vocab_size"] == 257


def test_bits_per_byte_is_total_nats_over_bytes(trained):
    root, cfg, run = trained
    model, rc, _ = load_model_from_checkpoint(run)
    from torchpeer.data import prepare_split
    from torchpeer.lm.evaluate import evaluate

    tf = prepare_split(rc.data, rc.data.valid["v"], "v", progress=False)
    r = evaluate(model, tf, 8, 32)
    text = (root / "valid.txt").read_text()
    assert tf.n_bytes == len(text.encode())
    # byte tokenizer: one eot then one token per byte, so targets = bytes and bpb = loss / ln 2
    assert r["tokens"] == len(text.encode())
    assert r["bpb"] == pytest.approx(r["loss"] / math.log(2), rel=1e-12)


def test_grad_accum_and_flop_budget(tmp_path):
    """A FLOP budget stops the run after the whole steps it affords; accumulation multiplies the tokens."""
    from torchpeer.lm.info import config_cost

    write_corpus(tmp_path)
    cfg = load_config(
        write_config(tmp_path), ["--train.grad_accum", "2", "--train.max_steps", "none", "--train.max_flops", "1e30"]
    )
    cfg.model.vocab_size = 257
    per_step = config_cost(cfg.model).train_flops * 2 * 8 * 32
    cfg.train.max_flops = 3.5 * per_step
    cfg.train.ckpt_interval = 2
    summary = train(cfg, str(tmp_path / "run"), progress=False)
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 2 * 8 * 32
    assert summary["train_flops"] == 3 * per_step <= cfg.train.max_flops
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2, 3]


class Recorder(Callback):
    """Remembers every hook call; stops the run at ``stop_at``."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at = [], stop_at

    def on_train_start(self, trainer):
        self.calls.append(("start", trainer.step))

    def on_step_end(self, trainer, step, metrics):
        self.calls.append(("step", step, sorted(metrics)))
        if step == self.stop_at:
            trainer.request_stop("enough")

    def on_eval(self, trainer, step, results):
        self.calls.append(("eval", step, sorted(results)))

    def on_checkpoint(self, trainer, path):
        self.calls.append(("checkpoint", os.path.basename(path)))

    def on_train_end(self, trainer, summary):
        self.calls.append(("end", summary["steps"]))


class CountingPlan(SingleProcessPlan):
    """The default plan, counting which seams the trainer goes through."""

    def __init__(self):
        self.counts = {}

    def _count(self, name):
        self.counts[name] = self.counts.get(name, 0) + 1

    def wrap_model(self, model):
        self._count("wrap_model")
        return model

    def no_sync(self, wrapped, last_micro_batch):
        self._count("no_sync_last" if last_micro_batch else "no_sync")
        return super().no_sync(wrapped, last_micro_batch)

    def all_reduce_sum_(self, value):
        self._count("all_reduce_sum_")
        return value

    def save_checkpoint(self, *args, **kw):
        self._count("save_checkpoint")
        return super().save_checkpoint(*args, **kw)


def _tiny(tmp_path, *overrides, max_steps=12):
    write_corpus(tmp_path)
    return load_config(write_config(tmp_path, max_steps=max_steps), list(overrides))


def test_callbacks_and_plan_seams(tmp_path):
    cfg = _tiny(tmp_path, "--train.eval_interval", "4", "--train.ckpt_interval", "5", "--train.grad_accum", "2")
    rec, plan = Recorder(), CountingPlan()
    summary = train(cfg, str(tmp_path / "run"), progress=False, callbacks=[rec], plan=plan)
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "start" and kinds[-1] == "end" and rec.calls[-1] == ("end", 12)
    steps = [c for c in rec.calls if c[0] == "step"]
    assert [c[1] for c in steps] == list(range(1, 13))
    assert set(steps[0][2]) >= {"step", "tokens", "lr", "loss", "grad_norm"}  # log_interval = 1
    assert [c[1] for c in rec.calls if c[0] == "eval"] == [4, 8, 12]  # periodic + the final one
    assert [c[1] for c in rec.calls if c[0] == "checkpoint"] == ["step_00000005", "step_00000010", "step_00000012"]
    assert plan.counts["wrap_model"] == 1 and plan.counts["save_checkpoint"] == 3
    assert plan.counts["no_sync"] == plan.counts["no_sync_last"] == 12  # grad_accum 2: one of each per step
    assert plan.counts["all_reduce_sum_"] == 3  # one per evaluation of the one valid set
    assert summary["world_size"] == 1
    # the memory estimate beside the allocator's peak (CUDA only; None on the CPU)
    from torchpeer.lm.memory import estimate_step_memory

    estimate = estimate_step_memory(cfg, "cpu").total
    assert summary["memory"] == {"estimate": estimate, "peak": None, "peak_over_estimate": None}


def test_request_stop_finishes_the_run_early(tmp_path):
    cfg = _tiny(tmp_path)
    summary = train(cfg, str(tmp_path / "run"), progress=False, callbacks=[Recorder(stop_at=3)])
    assert summary["steps"] == 3 and summary["stopped"] == "enough"
    assert [os.path.basename(p) for p in list_checkpoints(tmp_path / "run")] == ["step_00000003"]
    assert records(tmp_path / "run")[-1]["final"]


def test_trainer_parts_step_by_step(tmp_path):
    """build / train_step / evaluate / save / load, driven by hand, give the same numbers as train()."""
    cfg = _tiny(tmp_path, max_steps=4)
    ref = train(cfg, str(tmp_path / "ref"), progress=False)
    trainer = Trainer(_tiny(tmp_path, max_steps=4), str(tmp_path / "run"), progress=False).build()
    trainer._t_start = 0.0
    out = [trainer.train_step() for _ in range(2)]
    assert trainer.step == 2 and all(torch.isfinite(o["loss"]) and o["grad_norm"] > 0 for o in out)
    path = trainer.save_checkpoint()
    assert os.path.basename(path) == "step_00000002"
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train_step()
    trainer.load_checkpoint(path)  # back to step 2: the same weights, sampler and RNG
    assert trainer.step == 2
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())
    again = [trainer.train_step() for _ in range(2)]
    logged = dict(losses(tmp_path / "ref"))
    assert [o["loss"].item() for o in out + again] == [logged[s] for s in (1, 2, 3, 4)]  # log_interval 1
    results = trainer.evaluate(None)
    assert results["v"]["loss"] == pytest.approx(ref["valid"]["v"]["loss"], rel=1e-12)


def test_config_json_records_backends(trained):
    root, cfg, run = trained
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["backends"] == {"blocks.1.ffw": {"product_key_topk": "torch", "expert_mix": "torch"}}
    start = records(run)[0]
    assert start["event"] == "start" and start["backends"] == saved["backends"] and start["world_size"] == 1
    from torchpeer.lm.run_messages import format_backends

    two = {"blocks.0.ffw": {"expert_mix": "torch"}, "blocks.2.ffw": {"expert_mix": "torch"}, "x": {"op": "triton"}}
    assert format_backends(two) == "expert_mix=torch (blocks.0.ffw, blocks.2.ffw); op=triton (x)"


def test_aux_loss_of_any_module_is_added(tmp_path):
    """The trainer adds aux_loss() of every module that defines one (here a token-choice MoE)."""
    from torchpeer.layers.registry import sum_aux_losses as aux_loss

    moe_flags = ["--model.ffw", "moe", "--model.moe.n_experts", "4", "--model.moe.routing", "token_choice"]
    cfg = _tiny(tmp_path, *moe_flags, "--model.moe.aux_loss_weight", "0.5", max_steps=2)
    trainer = Trainer(cfg, str(tmp_path / "run"), progress=False).build()
    x, y = next(iter(trainer.sampler))
    _, loss = trainer.model(x, y)
    term = aux_loss(trainer.model)
    moe = trainer.model.blocks[1].ffw
    assert term is not None and term.requires_grad and torch.equal(term, moe.aux_loss())
    assert term.item() == pytest.approx(0.5 * moe.balance_loss.item())
    assert aux_loss(Trainer(_tiny(tmp_path, max_steps=2), str(tmp_path / "r2"), progress=False).build().model) is None


def test_oversized_step_is_refused_before_the_model_is_built(tmp_path, capsys, monkeypatch):
    from torchpeer.cli import main

    def no_build(*args, **kw):
        raise AssertionError("the model was allocated")

    monkeypatch.setattr(SingleProcessPlan, "build_model", no_build)
    write_corpus(tmp_path)
    cfg = write_config(tmp_path)
    assert main(["train", cfg, "--run-dir", str(tmp_path / "run"), "--model.seq_len", "1000000", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a training step needs about") and err.count("\n") == 1
    assert "model.seq_len (now 1000000)" in err and "train.batch_size" in err
    assert not os.path.exists(tmp_path / "run")


def test_missing_tensorboard_is_one_note(tmp_path, capsys, monkeypatch):
    import sys

    from torchpeer.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=2)
    run = tmp_path / "run"
    assert main(["train", cfg, "--run-dir", str(run), "--train.tensorboard", "true", "--no-progress"]) == 0
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if line.startswith("tensorboard is not installed")]
    assert len(notes) == 1 and f"torchpeer plot {run}" in notes[0] and not os.path.exists(run / "tb")


def test_init_from_loads_starting_weights_on_a_fresh_run_only(trained, tmp_path):
    root, cfg_path, run = trained
    source, _, _ = load_model_from_checkpoint(run)
    calls = []

    def init(model):
        calls.append(model)
        model.load_state_dict(source.state_dict())

    cfg = load_config(cfg_path, ["--train.max_steps", "1", "--train.lr", "1e-9", "--train.warmup_steps", "0"])
    trainer = Trainer(cfg, str(tmp_path / "run"), progress=False, init_from=init).build()
    assert calls == [trainer.model]
    before = trainer.evaluate(2)["v"]["loss"]
    source_eval = Trainer(load_config(cfg_path), str(tmp_path / "r2"), progress=False).build()
    source_eval.model.load_state_dict(source.state_dict())
    assert before == source_eval.evaluate(2)["v"]["loss"]  # the trained weights, not a fresh init
    trainer.fit()
    resumed = Trainer(cfg, str(tmp_path / "run"), resume=True, progress=False, init_from=init).build()
    assert len(calls) == 1 and resumed.step == 1  # a resume takes its own checkpoint, not init_from


def test_rowwise_adam_tables_update_in_the_backward_and_resume_exactly(tmp_path):
    """train.expert_optimizer=rowwise_adam (Triton interpreter on the CPU): the PEER tables leave the
    AdamW groups, change at every step, and a resume restores the table optimizer's moments."""

    class Probe(Recorder):
        def on_train_start(self, trainer):
            peer = trainer.model.blocks[1].ffw
            in_adamw = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
            assert not peer.down.requires_grad and trainer.table_optimizer is not None
            assert id(peer.down) not in in_adamw and id(peer.up) not in in_adamw
            self.table = peer.down.detach().clone()

        def on_step_end(self, trainer, step, metrics):
            assert not torch.equal(self.table, trainer.model.blocks[1].ffw.down)  # updated in the backward
            trainer.request_stop("probe")

    write_corpus(tmp_path)
    flags = ["--train.expert_optimizer", "rowwise_adam", "--train.max_steps", "3", "--train.ckpt_interval", "2"]
    flags += ["--model.seq_len", "8", "--train.batch_size", "2", "--data.valid", "{}"]
    cfg = write_config(tmp_path)
    train(load_config(cfg, flags), str(tmp_path / "ref"), progress=False)
    assert train(load_config(cfg, flags), str(tmp_path / "run"), progress=False, callbacks=[Probe()])["steps"] == 1
    assert train(load_config(cfg, flags), str(tmp_path / "run"), resume=True, progress=False)["steps"] == 3
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    with pytest.raises(ValueError, match="rowwise_adam updates the tables inside the backward: use train.grad_accum 1"):
        load_config(cfg, flags + ["--train.grad_accum", "2"])


@pytest.mark.parametrize("optimizer", ["rowwise_adam_bf16", "elementwise_adam_bf16"])
def test_rowwise_adam_bf16_keeps_bf16_tables_with_fp32_masters_and_resumes_exactly(tmp_path, optimizer):
    """train.expert_optimizer=rowwise_adam_bf16 / elementwise_adam_bf16: the layer's tables are bf16
    working copies, the fp32 masters (and element-wise: the (N, d) second moments) live in the table
    optimizer and its checkpoint state, and a resume continues exactly."""
    import torch

    seen = {}

    class Probe(Recorder):
        def on_step_end(self, trainer, step, metrics):
            peer = trainer.model.blocks[1].ffw
            seen["dtype"] = peer.down.dtype
            masters = [v for v in trainer.table_optimizer.state_dict().values() if isinstance(v, dict)]
            seen["state"] = trainer.table_optimizer.state_dict()
            seen["masters"] = masters
            trainer.request_stop("probe")

    write_corpus(tmp_path)
    flags = ["--train.expert_optimizer", optimizer, "--train.max_steps", "3", "--train.ckpt_interval", "2"]
    flags += ["--model.seq_len", "8", "--train.batch_size", "2", "--data.valid", "{}"]
    cfg = write_config(tmp_path)
    train(load_config(cfg, flags), str(tmp_path / "ref"), progress=False)
    assert train(load_config(cfg, flags), str(tmp_path / "run"), progress=False, callbacks=[Probe()])["steps"] == 1
    assert seen["dtype"] == torch.bfloat16
    fp32 = [t for t in _tensors(seen["state"]) if t.dtype == torch.float32 and t.dim() == 2]
    assert fp32, "the table optimizer holds no fp32 master tables"
    layer_state = seen["state"]["layers"]["blocks.1.ffw"]["down"]
    assert layer_state["exp_avg_sq"].shape == layer_state["master"].shape[: 2 if "elementwise" in optimizer else 1]
    assert train(load_config(cfg, flags), str(tmp_path / "run"), resume=True, progress=False)["steps"] == 3
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")  # (the fp32-table rule: the test above)
    choices = "adamw, rowwise_adam, rowwise_adam_bf16, elementwise_adam, elementwise_adam_bf16"
    with pytest.raises(ValueError, match=f"train.expert_optimizer='elementwise'; use one of {choices}"):
        load_config(cfg, flags + ["--train.expert_optimizer", "elementwise"])
    with pytest.raises(ValueError, match=f"{optimizer} updates the tables inside the backward: use train.grad_accum 1"):
        load_config(cfg, flags + ["--train.grad_accum", "2"])


def test_fused_table_optimizer_on_the_winners_shared_pool_trains_and_resumes_exactly(tmp_path):
    """gpu-peer-multi-tuned-small's design at a tiny size (PEER blocks 1 and 3 on one shared pool, the
    balance term, expert lr and decay) with train.expert_optimizer=rowwise_adam_bf16: the pool's state
    exists once (under its module name), its bf16 tables change at every step, a resume continues exactly."""
    seen = {}

    class Probe(Recorder):
        def on_step_end(self, trainer, step, metrics):
            seen["owners"] = list(trainer.table_optimizer.state_dict()["layers"])
            seen["steps"] = trainer.table_optimizer.states["ffw_shared"][0].steps.max().item()
            seen["dtype"] = trainer.model.ffw_shared.down.dtype
            trainer.request_stop("probe")

    write_corpus(tmp_path)
    flags = ["--train.expert_optimizer", "rowwise_adam_bf16", "--train.max_steps", "2", "--model.seq_len", "8"]
    flags += ["--train.batch_size", "2", "--data.valid", "{}", "--model.n_layers", "4", "--model.placement", "[1, 3]"]
    flags += ["--model.peer.shared_pool", "true", "--model.peer.balance_weight", "0.01"]
    flags += ["--model.peer.balance_stride", "8", "--train.expert_lr", "3e-3", "--train.expert_weight_decay", "1.0"]
    cfg = write_config(tmp_path)
    train(load_config(cfg, flags), str(tmp_path / "ref"), progress=False)
    assert train(load_config(cfg, flags), str(tmp_path / "run"), progress=False, callbacks=[Probe()])["steps"] == 1
    assert seen == {"owners": ["ffw_shared"], "steps": 1, "dtype": torch.bfloat16}  # one step from both layers
    assert train(load_config(cfg, flags), str(tmp_path / "run"), resume=True, progress=False)["steps"] == 2
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def _tensors(obj):
    """Every tensor inside a nested dict/list (a state_dict)."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_python_train_leaves_a_foreign_config_json_alone(tmp_path):
    """train() from Python (not only the command line) refuses a folder whose config.json is not a
    torchpeer run's (an export-hf or transformers model folder): one ValueError, the file unchanged."""
    from tests.lm.helpers import write_config, write_corpus
    from torchpeer.lm import load_config
    from torchpeer.lm import train as train_fn

    write_corpus(tmp_path)
    cfg = load_config(write_config(tmp_path))
    folder = tmp_path / "model"
    folder.mkdir()
    foreign = '{"architectures": ["GPT2LMHeadModel"], "n_embd": 768}'
    (folder / "config.json").write_text(foreign)
    with pytest.raises(ValueError, match="holds another config.json, not a torchpeer run's"):
        train_fn(cfg, str(folder), progress=False)
    assert (folder / "config.json").read_text() == foreign and sorted(os.listdir(folder)) == ["config.json"]


def test_tokens_per_s_after_a_resume_counts_only_the_steps_it_timed(tmp_path, monkeypatch):
    """A resume restores the loss window (the steps since the last log line) but not their time: the
    first tok/s after it divided all of the window's tokens by this session's seconds (a resume at
    step 104 with log_interval 10 showed 1.7x the real speed). With a clock that moves 1 s per step,
    every logged tok/s is one step's tokens."""
    import torchpeer.lm.trainer as trainer_mod

    class Clock:
        now = 1000.0

        def time(self):
            return self.now

    clock = Clock()
    monkeypatch.setattr(trainer_mod, "time", clock)
    step = Trainer.train_step

    def timed_step(self):
        clock.now += 1.0
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    cfg = _tiny(tmp_path, "--train.log_interval", "4", max_steps=8)
    run = str(tmp_path / "run")
    trainer = Trainer(cfg, run, progress=False).build()
    trainer._t_start = clock.now
    for _ in range(6):  # stopped between log lines: the checkpoint's loss window holds steps 5 and 6
        trainer.train_step()
    trainer.save_checkpoint()
    trainer.close()  # this session ends: the resume below may take the folder
    train(_tiny(tmp_path, "--train.log_interval", "4", max_steps=8), run, resume=True, progress=False)
    logged = [r for r in records(run) if "tok_per_s" in r]
    assert [r["step"] for r in logged] == [8]
    assert logged[0]["tok_per_s"] == trainer.tokens_per_step


def test_a_config_name_instead_of_a_run_config_is_one_clear_type_error(tmp_path):
    """train("ptb-tiny", run_dir) raised AttributeError: 'str' object has no attribute 'validate'."""
    wanted = r"must be a RunConfig, got str; read one with torchpeer.lm.load_config\('ptb-tiny'\)"
    with pytest.raises(TypeError, match=wanted):
        train("ptb-tiny", str(tmp_path / "run"), progress=False)
    with pytest.raises(TypeError, match="got dict"):
        Trainer({"model": {}}, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_periodic_evaluations_leave_training_unchanged(tmp_path):
    """An evaluation mid-run (eval mode, usage tracking, the ema query norm's running statistics)
    must not change what training computes: the campaign adds evaluation points to runs whose
    partners trained without them (ablate-experts' seed-1 row) and compares them step for step."""
    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=24, extra="checkpoint = false")
    flags = ["--model.peer.query_norm", "ema", "--model.seq_len", "16"]
    train(load_config(cfg, flags + ["--train.eval_interval", "1000"]), str(tmp_path / "once"), progress=False)
    train(load_config(cfg, flags + ["--train.eval_interval", "5"]), str(tmp_path / "often"), progress=False)
    assert [s for s, _ in evals(tmp_path / "often")][:4] == [5, 10, 15, 20]
    assert losses(tmp_path / "often") == losses(tmp_path / "once")  # bit for bit, every step
    assert evals(tmp_path / "often")[-1] == evals(tmp_path / "once")[-1]  # the final evaluation too
