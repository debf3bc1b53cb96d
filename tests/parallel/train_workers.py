"""Workers of test_distributed_training.py: tiny PEER LM runs in gloo processes."""

from __future__ import annotations

import os
import random

TINY = """\
[model]
d_model = 32
n_layers = 2
n_heads = 2
seq_len = 16
ffw = "peer"

[model.peer]
n_experts = 64
heads = 2
top_k = 4
d_key = 8

[train]
device = "cpu"
batch_size = 8
max_steps = 6
lr = 3e-3
warmup_steps = 2
log_interval = 1
eval_interval = 100
eval_batches = 2
ckpt_interval = 2
keep_checkpoints = 3
tensorboard = false

[data]
train = "{root}/train.txt"
tokenizer = "byte"
cache_dir = "{root}/cache"

[data.valid]
v = "{root}/valid.txt"
"""


def write_tiny(root: str) -> str:
    """A tiny corpus and the config above; returns the config path."""
    rng = random.Random(0)
    words = "the cat dog sat on mat a big small red blue ran fast slow home tree".split()

    def text(n):
        return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) for _ in range(n))

    with open(os.path.join(root, "train.txt"), "w") as fh:
        fh.write(text(1500))
    with open(os.path.join(root, "valid.txt"), "w") as fh:
        fh.write(text(60))
    path = os.path.join(root, "tiny.toml")
    with open(path, "w") as fh:
        fh.write(TINY.format(root=root))
    return path


def config(path: str):
    from torchpeer.lm.config_io import load_config

    return load_config(path)


def train_run(rank: int, world: int, cfg_path: str, run_dir: str, resume: bool, kill_at_save: int | None) -> None:
    """train() with the DistributedPlan; kill_at_save: os._exit(17) on every rank right after the
    DCP shards of that step are written (before the folder is renamed into place)."""
    from torchpeer.lm.train import train
    from torchpeer.parallel import DistributedPlan
    from torchpeer.parallel import checkpoint as dcp_io

    if kill_at_save is not None:
        real_save = dcp_io.dcp.save

        def save(state, checkpoint_id):
            real_save(state, checkpoint_id=checkpoint_id)
            if f".step_{kill_at_save:08d}." in checkpoint_id:
                os._exit(17)  # a kill mid-save: shards written, folder not yet in place

        dcp_io.dcp.save = save
    train(config(cfg_path), run_dir, resume=resume, progress=False, plan=DistributedPlan())
