"""Workers of test_distributed_training.py: tiny PEER LM runs in gloo processes."""

from __future__ import annotations

import os

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
    """The tiny corpus of the LM tests and the config above; returns the config path."""
    import pathlib

    from tests.lm.helpers import write_corpus

    write_corpus(pathlib.Path(root))
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


def gloo_threads() -> int:
    """The threads of this process that gloo process groups run (workers, TCP loops; Linux names)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as fh:
            names.append(fh.read())
    return sum("gloo" in n for n in names)


def train_then_no_gloo_threads(rank: int, world: int, cfg_path: str, run_dir: str, resume: bool = False) -> None:
    """After train() with the DistributedPlan returns, its process groups are gone with their threads,
    not kept alive (until interpreter shutdown) by references the library holds. The run must save a
    checkpoint (the DCP device mesh) and evaluate at its end: a fresh run of 2 steps, or (resume) the
    rest of a run that does."""
    from torchpeer.lm.train import train
    from torchpeer.parallel import DistributedPlan

    plan = DistributedPlan()
    join, during = plan.setup, []

    def setup(device):
        out = join(device)  # joins the group, as under torchrun (run_workers(..., init_group=False))
        during.append(gloo_threads())
        return out

    plan.setup = setup
    cfg = config(cfg_path)
    if not resume:
        cfg.train.max_steps = 2  # a checkpoint (the DCP device mesh) and the final evaluation
    train(cfg, run_dir, resume=resume, progress=False, plan=plan)
    assert during[0] > 0  # the count below means something
    assert gloo_threads() == 0, f"rank {rank}: {gloo_threads()} gloo threads alive after the run"
