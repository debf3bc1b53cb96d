"""Step-memory estimate (torchpeer.lm.memory): exact parameter bytes, refusal of an oversized config
before anything is allocated (with the knobs named), and an upper bound of a real run's peak RSS."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from torchpeer.lm import load_config
from torchpeer.lm.memory import available_memory, check_fits, estimate_step_memory
from torchpeer.lm.model import TransformerLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(*overrides):
    cfg = load_config("ptb-tiny", ["--train.device", "cpu", *overrides])
    cfg.model.vocab_size = 4096
    return cfg


@pytest.mark.parametrize(
    "overrides",
    [
        "--model.ffw peer",
        "--model.ffw peer --model.peer.shared_keys false --model.peer.query_norm layer --model.tie_embeddings false",
        "--model.ffw dense --model.dense.swiglu true --model.dense.d_hidden 96",
        "--model.ffw pkm --model.pkm.n_keys 16 --model.pkm.heads 2 --model.pkm.top_k 4 --model.pkm.d_key 16",
        "--model.ffw pkm --model.pkm.n_keys 16 --model.pkm.top_k 4 --model.pkm.value_dim 48 --model.placement all",
        "--model.ffw moe --model.moe.n_experts 4 --model.moe.d_expert 32",
        "--model.ffw peer --model.placement all --model.peer.shared_pool true",
        "--model.ffw peer --model.placement all --model.peer.shared_pool true --model.peer.readout glu",
        "--model.ffw peer --model.peer.readout glu",
        "--model.ffw peer --model.peer.readout gated",
        "--model.ffw dense --model.logit_prior unigram",
        "--model.ffw peer --model.logit_prior unigram --model.tie_embeddings false",
    ],
)
def test_parameter_bytes_match_a_built_model(overrides):
    cfg = tiny_cfg(*"--model.d_model 64 --model.n_layers 3 --model.peer.n_experts 1024".split(), *overrides.split())
    est = estimate_step_memory(cfg, "cpu")
    n = sum(p.numel() for p in TransformerLM(cfg.model).parameters())
    assert est.parameters == 4 * n
    assert est.gradients == 4 * n
    assert est.optimizer >= 8 * n  # two fp32 AdamW moments


def test_parts_add_up_and_scale_with_the_batch():
    base = "--model.d_model 64 --model.n_layers 2 --model.peer.n_experts 1024".split()
    est = estimate_step_memory(tiny_cfg(*base), "cpu")
    assert est.total == sum(est.breakdown().values())
    assert est.tokens == 16 * 128
    # activations and logits scale with the tokens of a micro-batch; the weights and their state do not
    big = estimate_step_memory(tiny_cfg(*base, "--train.batch_size", "64"), "cpu")
    assert big.logits == 4 * est.logits and big.activations == 4 * est.activations
    assert big.parameters == est.parameters and big.optimizer == est.optimizer
    # an evaluation batch 4x the training batch: its logits (no gradients) are the larger ones
    wide = estimate_step_memory(tiny_cfg(*base, "--train.eval_batch_size", "64"), "cpu")
    assert wide.logits == 3 * est.logits and wide.activations == est.activations


def test_default_config_fits_here():
    est = check_fits(tiny_cfg(), "cpu")
    assert 100 * 2**20 < est.total < 2 * 2**30, est.format()
    free, source = available_memory("cpu")
    assert free > 0 and ("MemAvailable" in source or "cgroup" in source)


def test_oversized_seq_len_is_refused_quickly_and_names_the_knobs():
    code = (
        "import time\n"
        "from torchpeer.lm import load_config\n"
        "from torchpeer.lm.memory import check_fits\n"
        "t = time.time()\n"
        "cfg = load_config('ptb-tiny', ['--model.seq_len', '1000000', '--train.device', 'cpu'])\n"
        "cfg.model.vocab_size = 4096\n"
        "try:\n"
        "    check_fits(cfg)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
        "print('SECONDS', time.time() - t)\n"
        "import sys; print('torch._dynamo' if 'torch._dynamo' in sys.modules else 'no dynamo')\n"
        "print('PEAK_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    msg = out.stdout
    assert "a training step needs about" in msg and "TiB" in msg
    for knob in ("train.batch_size", "model.seq_len", "train.grad_accum", "model.d_model"):
        assert knob in msg, msg
    assert "now 1000000" in msg
    seconds = float(msg.split("SECONDS")[1].split()[0])
    assert seconds < 5, seconds
    assert int(msg.split("PEAK_KB")[1].split()[0]) < 1.5 * 2**20  # < 1.5 GiB: nothing step-sized allocated
    assert "torch._dynamo" not in msg


def test_budget_boundary_and_knob_order():
    cfg = tiny_cfg()
    est = estimate_step_memory(cfg, "cpu")
    assert check_fits(cfg, "cpu", available=est.total) == est
    with pytest.raises(ValueError, match="train.batch_size"):
        check_fits(cfg, "cpu", available=est.total - 1)
    # a model whose weights dominate: the size knobs come first
    big = tiny_cfg("--model.peer.n_experts", str(2048**2), "--train.batch_size", "1", "--model.seq_len", "16")
    with pytest.raises(ValueError) as info:
        check_fits(big, "cpu", available=2**30)
    msg = str(info.value)
    assert msg.index("model.d_model") < msg.index("train.batch_size")
    assert "model.peer.n_experts (now 4194304)" in msg


def test_bf16_on_cuda_halves_matmul_activations():
    cfg = tiny_cfg("--model.ffw", "dense", "--train.dtype", "bf16")
    cpu = estimate_step_memory(cfg, "cpu")
    gpu = estimate_step_memory(cfg, "cuda")
    assert gpu.attention < cpu.attention and gpu.optimizer < cpu.optimizer  # bf16; fused AdamW has no temp
    assert gpu.logits > cpu.logits  # the bf16 logits beside their fp32 copy


def test_estimate_bounds_a_real_run_peak_rss():
    """Upper bound with a margin: a real 3-step CPU run (scripts/calibrate_memory.py) peaks below the
    estimate but not far below it."""
    path = os.path.join(REPO, "scripts", "calibrate_memory.py")
    spec = importlib.util.spec_from_file_location("calibrate_memory", path)
    calib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calib)
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        with open(os.path.join(root, "train.txt"), "w") as fh:
            fh.write("".join(f"plain text line {i} for a byte tokenizer\n" for i in range(3000)))
        rec = calib.measure("dense", "--model.ffw dense --train.batch_size 16 --model.seq_len 256", root)
    assert 0.5 < rec["ratio"] <= 1.0, json.dumps(rec)


def test_train_cli_refuses_an_oversized_step_before_allocating(tmp_path):
    """`torchpeer train --model.seq_len 1000000` (issue 13: ran 43 s, then OOM-killed at 24 GB) now
    stops at the trainer's check: one error line naming the knobs, exit 2, nothing written."""
    (tmp_path / "train.txt").write_text("".join(f"some training text, line {i}\n" for i in range(2000)))
    run_dir = tmp_path / "run"
    argv = [
        *("-m torchpeer.cli train --model.seq_len 1000000 --data.tokenizer byte --train.device cpu").split(),
        *("--data.train", str(tmp_path / "train.txt"), "--data.valid.ptb", str(tmp_path / "train.txt")),
        *("--data.cache_dir", str(tmp_path / "cache"), "--run-dir", str(run_dir)),
    ]
    t0 = time.time()
    with open(tmp_path / "stderr", "w") as fh:
        child = subprocess.Popen([sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=fh, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS
    seconds = time.time() - t0
    stderr = (tmp_path / "stderr").read_text()
    assert os.waitstatus_to_exitcode(status) == 2, stderr
    err = stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: a training step needs about"), stderr
    for knob in ("train.batch_size", "model.seq_len (now 1000000)", "train.grad_accum"):
        assert knob in err[0]
    assert not run_dir.exists()
    assert usage.ru_maxrss < 1.5 * 2**20  # KiB: < 1.5 GiB peak, nothing step-sized was allocated
    assert seconds < 30, seconds  # imports included; the check itself is timed above (< 5 s)


@pytest.mark.parametrize(
    "optimizer", ["rowwise_adam", "rowwise_adam_bf16", "elementwise_adam", "elementwise_adam_bf16"]
)
def test_rowwise_adam_state_bytes_match_the_attached_optimizer(optimizer, monkeypatch):
    """With a fused table optimizer the tables have no gradients and no AdamW moments: the estimate's
    parameters + gradients + optimizer equal the bytes of the built model, the table optimizer's state
    (an element-wise second moment: 4 more bytes per table element) and AdamW's two moments of the
    other parameters."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from torchpeer.lm.config import FUSED_EXPERT_OPTIMIZERS
    from torchpeer.optim import attach_rowwise_adam

    cfg = tiny_cfg(*"--model.d_model 64 --model.n_layers 3 --model.peer.n_experts 1024 --model.ffw peer".split())
    cfg.train.expert_optimizer = optimizer
    est = estimate_step_memory(cfg, "cuda")  # no CPU-only optimizer allowance
    model = TransformerLM(cfg.model)
    opt = attach_rowwise_adam(model, 1e-3, **FUSED_EXPERT_OPTIMIZERS[optimizer])
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = sum(
        t.numel() * t.element_size() for pair in opt.states.values() for s in pair for t in s.state_dict().values()
    )
    assert est.parameters == params
    assert est.gradients == 4 * trained
    assert est.optimizer == state + 8 * trained


def test_a_shared_pools_fused_state_and_kept_selections_are_counted_once(monkeypatch):
    """A fused table optimizer on a shared pool: the estimate counts the pool's state once (not once per
    layer) and, as activations, exactly the bytes its layers' backwards keep for step() (pool_stash_bytes)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import torch

    from torchpeer.lm.memory import pool_stash_bytes
    from torchpeer.optim import attach_rowwise_adam

    flags = "--model.d_model 32 --model.n_layers 3 --model.peer.n_experts 64 --model.ffw peer --model.placement all"
    cfg = tiny_cfg(*flags.split(), "--model.peer.shared_pool", "true", "--model.peer.heads", "2")
    cfg.model.peer.top_k, cfg.model.vocab_size = 4, 64
    cfg.train.expert_optimizer = "elementwise_adam_bf16"
    est = estimate_step_memory(cfg, "cuda")
    model = TransformerLM(cfg.model)
    opt = attach_rowwise_adam(model, 1e-3, bf16_tables=True, elementwise=True)
    state = sum(t.numel() * t.element_size() for s in opt.states["ffw_shared"] for t in s.state_dict().values())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert list(opt.states) == ["ffw_shared"] and est.optimizer == state + 8 * trained
    idx = torch.randint(0, 64, (1, 5))
    model(idx, idx)[1].backward()
    kept = opt.deferred["ffw_shared"]._kept
    assert len(kept) == 3  # (the CPU forward runs in fp32: 4 bytes a value of x and dy)
    assert sum(t.numel() * t.element_size() for k in kept.values() for t in k[:6]) == pool_stash_bytes(cfg, 5, 4)
    stash = pool_stash_bytes(cfg, est.tokens, 2 if cfg.train.dtype == "bf16" else 4)
    cfg.train.expert_optimizer = "adamw"
    assert stash > 0 and est.activations - estimate_step_memory(cfg, "cuda").activations == stash


def test_before_the_tokenizer_sets_it_the_vocabulary_is_the_one_it_will_give():
    """A byte run's logits are over 257 ids, not data.vocab_size (a bpe target the byte tokenizer
    ignores: the estimate used to take it, 8192 ids' worth of logits for a 257-id model)."""
    base = "--model.d_model 64 --model.n_layers 2 --model.peer.n_experts 1024 --data.tokenizer byte".split()
    unset = load_config("ptb-tiny", ["--train.device", "cpu", *base])
    assert unset.model.vocab_size is None and unset.data.vocab_size != 257
    resolved = load_config("ptb-tiny", ["--train.device", "cpu", *base, "--model.vocab_size", "257"])
    assert estimate_step_memory(unset, "cpu").total == estimate_step_memory(resolved, "cpu").total
    bpe = load_config("ptb-tiny", ["--train.device", "cpu", *base[:-2]])
    sized = load_config(
        "ptb-tiny", ["--train.device", "cpu", *base[:-2], "--model.vocab_size", str(bpe.data.vocab_size)]
    )
    assert estimate_step_memory(bpe, "cpu").total == estimate_step_memory(sized, "cpu").total
