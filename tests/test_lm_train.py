"""Training: loss goes down, optimizer groups, schedules, checkpoints, exact resume after SIGKILL,
resume errors, and `eval` / `generate` on the trained run."""

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from torchpeer.cli import main
from torchpeer.lm.checkpoint import list_checkpoints, load_model_from_checkpoint
from torchpeer.lm.config import ModelConfig, PEERConfig, PKMConfig, TrainConfig, load_config
from torchpeer.lm.model import TransformerLM
from torchpeer.lm.optim import LRSchedule, param_groups
from torchpeer.lm.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_TOML = """\
[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 32
ffw = "peer"

[model.peer]
n_experts = 64
heads = 2
top_k = 4
d_key = 16

[train]
device = "cpu"
batch_size = 8
max_steps = {max_steps}
lr = 3e-3
warmup_steps = 5
log_interval = 1
eval_interval = 20
eval_batches = 2
ckpt_interval = 10
keep_checkpoints = 2
tensorboard = false

[data]
train = "{root}/train.txt"
tokenizer = "byte"
cache_dir = "{root}/cache"

[data.valid]
v = "{root}/valid.txt"
"""


def write_corpus(root) -> None:
    rng = random.Random(0)
    words = "the cat dog sat on mat a big small red blue ran fast slow home tree".split()

    def text(n):
        return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) for _ in range(n))

    (root / "train.txt").write_text(text(3000))
    (root / "valid.txt").write_text(text(200))


def write_config(root, max_steps=60) -> str:
    path = root / "tiny.toml"
    path.write_text(TINY_TOML.format(root=str(root), max_steps=max_steps))
    return str(path)


def losses(run_dir) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r]


def evals(run_dir) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    return [(r["step"], r["eval"]["v"]["loss"]) for r in recs if "eval" in r]


def cli_subprocess(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torchpeer.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny PEER run of 60 steps (in-process): (root, config path, run dir)."""
    root = tmp_path_factory.mktemp("lm")
    write_corpus(root)
    cfg = write_config(root)
    run = str(root / "run")
    assert main(["train", cfg, "--run-dir", run, "--no-progress"]) == 0
    return root, cfg, run


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


def test_sigkill_resume_matches_uninterrupted(tmp_path):
    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=150)
    ref, run = str(tmp_path / "ref"), str(tmp_path / "killed")
    p_ref = cli_subprocess("train", cfg, "--run-dir", ref)

    p = cli_subprocess("train", cfg, "--run-dir", run)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if list_checkpoints(run) and os.path.exists(os.path.join(run, "metrics.jsonl")):
            done = losses(run)
            if done and done[-1][0] >= 13:  # past the step-10 checkpoint, mid-interval
                break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = losses(run)[-1][0]
    assert killed_at < 150 and not os.path.exists(os.path.join(run, "summary.json"))

    p = cli_subprocess("train", cfg, "--run-dir", run, "--resume")
    assert p.wait() == 0, p.stderr.read().decode()
    assert p_ref.wait() == 0, p_ref.stderr.read().decode()
    assert losses(run) == losses(ref)  # exact floats, every step 1..150
    assert [s for s, _ in losses(run)] == list(range(1, 151))
    assert evals(run) == evals(ref)
    last = [os.path.join(d, "checkpoints", "step_00000150", "model.safetensors") for d in (run, ref)]
    a, b = (hashlib.sha256(open(f, "rb").read()).hexdigest() for f in last)
    assert a == b


def _tree_digest(folder) -> dict:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_resume_with_other_model_is_one_error_and_keeps_checkpoints(trained, capsys):
    root, cfg, run = trained
    before = _tree_digest(os.path.join(run, "checkpoints"))
    metrics_before = open(os.path.join(run, "metrics.jsonl")).read()
    assert main(["train", cfg, "--run-dir", run, "--resume", "--model.d_model", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and "model.d_model: checkpoint 32, now 64" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # starting over in a folder that has checkpoints, without --resume, is refused too
    assert main(["train", cfg, "--run-dir", run]) == 2
    assert "--resume" in capsys.readouterr().err
    assert _tree_digest(os.path.join(run, "checkpoints")) == before
    assert open(os.path.join(run, "metrics.jsonl")).read() == metrics_before


def test_eval_cli(trained, capsys, tmp_path):
    root, cfg, run = trained
    out = str(tmp_path / "e.json")
    args = ["eval", run, "--data", f"a={root}/valid.txt", "--data", f"b={root}/train.txt", "--out", out]
    assert main([*args, "--max-batches", "3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "blocks.1.ffw" in text and "bpb" in text
    res = json.load(open(out))["results"]
    assert set(res) == {"a", "b"}
    assert res["a"]["tokens"] == 3 * 8 * 32 and not res["a"]["complete"]
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert main(["eval", run, "--out", out, "--no-progress"]) == 0  # default: the config's valid sets
    full = json.load(open(out))["results"]["v"]
    assert full["loss"] == pytest.approx(summary["valid"]["v"]["loss"], rel=1e-6)


def test_generate_cli(trained, capsys):
    root, cfg, run = trained
    args = ["generate", run, "--prompt", "the cat", "--max-new-tokens", "40", "--seed", "3"]
    assert main(args) == 0
    a = capsys.readouterr().out
    assert a.startswith("the cat") and len(a) > len("the cat") + 10
    assert main(args) == 0
    assert capsys.readouterr().out == a  # seeded
    assert main(["generate", run, "--prompt", "the", "--temperature", "0", "--max-new-tokens", "20"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", run, "--prompt", "the", "--temperature", "0", "--max-new-tokens", "20", "--no-cache"]) == 0
    assert capsys.readouterr().out == greedy


def test_param_groups():
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        seq_len=8,
        vocab_size=40,
        ffw="peer",
        placement="all",
        peer=PEERConfig(n_experts=64, heads=2, top_k=4, d_key=16),
        tie_embeddings=False,
    )
    model = TransformerLM(cfg)
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr=1e-3, expert_lr=5e-3, weight_decay=0.1))}
    ids = {k: {id(p) for p in g["params"]} for k, g in groups.items()}
    all_ids = [id(p) for p in model.parameters()]
    assert sorted(all_ids) == sorted(i for s in ids.values() for i in s)  # each parameter exactly once
    for blk in model.blocks:
        assert {id(blk.ffw.down), id(blk.ffw.up)} <= ids["experts"]
        assert id(blk.ffw.sub_keys) in ids["no_decay"]  # product keys
        assert id(blk.norm1.weight) in ids["no_decay"] and id(blk.attn.qkv.weight) in ids["decay"]
    assert id(model.tok_emb.weight) in ids["no_decay"]
    assert groups["experts"]["lr"] == 5e-3 and groups["experts"]["weight_decay"] == 0.0
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0

    pkm = TransformerLM(
        ModelConfig(
            d_model=32,
            n_layers=2,
            n_heads=2,
            vocab_size=40,
            ffw="pkm",
            pkm=PKMConfig(n_keys=8, heads=2, top_k=4, d_key=16),
        )
    )
    groups = {g["name"]: {id(p) for p in g["params"]} for g in param_groups(pkm, TrainConfig())}
    assert id(pkm.blocks[1].ffw.values) in groups["experts"]
    assert id(pkm.blocks[1].ffw.query_proj.bias) in groups["no_decay"]


def test_lr_schedules():
    cos = LRSchedule("cosine", total_steps=110, warmup=10, min_ratio=0.1, decay_frac=0.2)
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(10) == pytest.approx(1.0) and cos(109) == pytest.approx(0.1)
    assert cos(59) == pytest.approx(0.55, abs=0.01)  # halfway down the cosine
    wsd = LRSchedule("wsd", total_steps=110, warmup=10, min_ratio=0.0, decay_frac=0.2)
    assert wsd(50) == 1.0 and wsd(87) == 1.0 and wsd(109) == pytest.approx(0.0)
    assert 0.0 < wsd(100) < 1.0
    assert LRSchedule("constant", 100, 10, 0.1, 0.2)(99) == 1.0


def test_config_overrides_and_errors():
    cfg = load_config(
        "ptb-tiny",
        [
            "--model.d_model",
            "64",
            "--train.max_flops=1e12",
            "--model.placement",
            "0,3",
            "--data.valid.test",
            "ptb:test",
            "--train.max_steps",
            "none",
        ],
    )
    assert cfg.model.d_model == 64 and cfg.train.max_flops == 1e12 and cfg.model.placement == [0, 3]
    assert cfg.data.valid == {"ptb": "ptb:valid", "test": "ptb:test"} and cfg.train.max_steps is None
    assert load_config("ptb-tiny", ["--model.placement", "1"]).model.placement == [1]
    with pytest.raises(ValueError, match="unknown config field 'model.d_modle'.*model.d_model"):
        load_config("ptb-tiny", ["--model.d_modle", "64"])
    with pytest.raises(ValueError, match="cannot parse --train.max_steps 'ten' as int"):
        load_config("ptb-tiny", ["--train.max_steps", "ten"])
    with pytest.raises(ValueError, match="unknown FFW kind"):
        load_config("ptb-tiny", ["--model.ffw", "mlp"])


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
