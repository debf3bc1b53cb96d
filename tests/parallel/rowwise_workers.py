"""Workers of test_rowwise_training.py: tiny PEER LM runs with a fused train.expert_optimizer
(rowwise_adam, elementwise_adam) in gloo processes (the fused update in Triton's interpreter),
several runs per spawn."""

from __future__ import annotations

import os
import shutil

from torchpeer.parallel import DistributedPlan

# small enough for Triton's interpreter: 2 x 8 tokens a step, 16 experts, no validation set;
# 3 steps with checkpoints at 2 and 3
FLAGS = ["--model.seq_len", "8", "--train.batch_size", "2"]
FLAGS += ["--train.max_steps", "3", "--train.ckpt_interval", "2", "--model.peer.n_experts", "16"]
FLAGS += ["--data.valid", "{}"]


def config(cfg_path: str, optimizer: str = "rowwise_adam"):
    from torchpeer.lm.config_io import load_config

    return load_config(cfg_path, FLAGS + ["--train.expert_optimizer", optimizer])


class KeepGroupPlan(DistributedPlan):
    """A DistributedPlan that leaves the process group open after its run (the next run of the
    same spawn joins it again; spawn.py closes it)."""

    def close(self) -> None:
        pass


def branch_at_step_2(src: str, dst: str) -> None:
    """dst = run folder src as it stood after its checkpoint of step 2 (step 3 and summary gone)."""
    shutil.copytree(src, dst)
    shutil.rmtree(os.path.join(dst, "checkpoints", "step_00000003"))
    os.remove(os.path.join(dst, "summary.json"))


def rowwise_runs(rank: int, world: int, cfg_path: str, root: str, optimizer: str) -> None:
    """On W ranks: run "wide" (3 steps, checkpoints at 2 and 3); "wide_resumed": wide's step-2
    checkpoint resumed here; "one_to_wide": the one-process run "ref"'s step-2 checkpoint resumed
    here; then DistributedPlan(shard_experts="never") is refused."""
    import torch.distributed as dist

    from torchpeer.lm.train import train

    def run(name: str, resume: bool) -> None:
        train(
            config(cfg_path, optimizer), os.path.join(root, name), resume=resume, progress=False, plan=KeepGroupPlan()
        )
        dist.barrier()

    run("wide", False)
    if rank == 0:
        branch_at_step_2(os.path.join(root, "wide"), os.path.join(root, "wide_resumed"))
        branch_at_step_2(os.path.join(root, "ref"), os.path.join(root, "one_to_wide"))
    dist.barrier()
    run("wide_resumed", True)
    run("one_to_wide", True)
    # tables replicated on 2 ranks would step apart: refused before anything is written
    from torchpeer.lm.trainer import Trainer

    cfg = config(cfg_path, optimizer)
    trainer = Trainer(cfg, os.path.join(root, "replicated"), progress=False, plan=KeepGroupPlan("never"))
    try:
        trainer.build()
    except ValueError as e:
        assert "needs the PEER tables sharded by columns" in str(e), e
    else:
        raise AssertionError("rowwise_adam with replicated tables on 2 ranks was not refused")
