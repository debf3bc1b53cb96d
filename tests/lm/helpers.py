"""Shared pieces of the LM tests: a tiny corpus and config, metrics readers, CLI subprocesses."""

import json
import os
import random
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def write_corpus(root, train_lines: int = 3000, valid_lines: int = 200) -> tuple[str, str]:
    """root/train.txt and root/valid.txt of random lines over 16 words (seeded); returns their paths."""
    rng = random.Random(0)
    words = "the cat dog sat on mat a big small red blue ran fast slow home tree".split()

    def text(n):
        return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) for _ in range(n))

    (root / "train.txt").write_text(text(train_lines))
    (root / "valid.txt").write_text(text(valid_lines))
    return str(root / "train.txt"), str(root / "valid.txt")


def write_config(root, max_steps=60, extra: str = "") -> str:
    """The tiny PEER config (byte tokenizer, d_model 32) on write_corpus(root); ``extra`` is appended
    to its [train] table (e.g. "checkpoint = false")."""
    path = root / "tiny.toml"
    text = TINY_TOML.format(root=str(root), max_steps=max_steps)
    path.write_text(text.replace("tensorboard = false\n", f"tensorboard = false\n{extra}\n"))
    return str(path)


def records(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def losses(run_dir) -> list[tuple[int, float]]:
    """(step, training loss) of every log record."""
    return [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]


def evals(run_dir) -> list[tuple[int, float]]:
    """(step, loss on eval set v) of every eval record."""
    return [(r["step"], r["eval"]["v"]["loss"]) for r in records(run_dir) if "eval" in r]


def cli_subprocess(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "torchpeer.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw
    )
