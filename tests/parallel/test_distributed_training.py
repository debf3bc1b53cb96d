"""A tiny PEER LM on 2 and 4 gloo processes computes the one-process training: same losses,
validation loss, usage and KL. A one-process checkpoint continues on 2 processes; that run, killed
mid-checkpoint, resumes from its previous (sharded) checkpoint on 1 and on 4 processes; the 4-process
run joins its process groups' threads before train() returns."""

import json
import os
import shutil

import pytest
import torch.multiprocessing as mp

from tests.parallel.spawn import run_workers
from tests.parallel.train_workers import config, train_run, train_then_no_gloo_threads, write_tiny


def _summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return json.load(fh)


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _assert_same_run(run_dir, ref_dir):
    got, ref = _summary(run_dir), _summary(ref_dir)
    v, r = got["valid"]["v"], ref["valid"]["v"]
    assert v["tokens"] == r["tokens"]
    assert v["loss"] == pytest.approx(r["loss"], rel=1e-5)
    for layer, u in r["usage"].items():
        assert v["usage"][layer]["usage_pct"] == pytest.approx(u["usage_pct"], abs=1e-9)
        assert v["usage"][layer]["kl"] == pytest.approx(u["kl"], rel=1e-5, abs=1e-6)
    assert got["steps"] == ref["steps"] and got["tokens"] == ref["tokens"]
    losses, ref_losses = _losses(run_dir), _losses(ref_dir)
    assert sorted(losses) == sorted(ref_losses)
    for step, loss in ref_losses.items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    return got


def test_one_process_to_2_killed_mid_save_resumed_on_1_and_4_equals_one_process(tmp_path):
    from torchpeer.lm.checkpoint import latest_checkpoint
    from torchpeer.lm.train import train

    cfg_path = write_tiny(str(tmp_path))
    ref = str(tmp_path / "ref")
    train(config(cfg_path), ref, progress=False)  # one process, checkpoints at 2, 4, 6; fills the token cache
    assert _summary(ref)["valid"]["v"]["usage"], "the reference run must report usage"

    # continue the one-process checkpoint of step 2 on 2 processes (model.safetensors -> column shards),
    # killed after the shards of step 6 are written but before the folder is renamed into place
    run2 = str(tmp_path / "run2")
    shutil.copytree(ref, run2)
    for name in ("step_00000004", "step_00000006"):
        shutil.rmtree(os.path.join(run2, "checkpoints", name))
    os.remove(os.path.join(run2, "summary.json"))
    with pytest.raises(mp.ProcessExitedException):
        run_workers(train_run, 2, cfg_path, run2, True, 6)
    latest = latest_checkpoint(run2)
    assert latest is not None and latest.endswith("step_00000004"), latest  # the partial save is not visible
    assert os.path.isdir(os.path.join(latest, "dcp"))  # the 2-process checkpoint is sharded
    leftovers = [n for n in os.listdir(os.path.join(run2, "checkpoints")) if n.endswith(".tmp")]
    assert leftovers, "the kill should have left the partial folder behind"
    run4 = str(tmp_path / "run4")
    shutil.copytree(run2, run4)

    # resume in one plain process (no torchrun): reads the 2-rank DCP checkpoint through the plan that
    # torchpeer.parallel hands in (the core's SingleProcessPlan does not read dcp/ folders)
    from torchpeer.parallel.plan import OneProcessDCPPlan

    train(config(cfg_path), run2, resume=True, progress=False, plan=OneProcessDCPPlan())
    assert _assert_same_run(run2, ref)["world_size"] == 1
    # resume on 4 processes, which join the group themselves (as under torchrun) and, when train()
    # returns, have no gloo thread left: destroy_process_group only unregisters a gloo group; the
    # expert group's ShardContext and the checkpoints' device mesh kept both groups, and their threads,
    # alive until interpreter shutdown, the likely cause of a rare SIGABRT ("terminate called without
    # an active exception") of a torchrun rank at exit. DistributedPlan.close() lets go of them. (A
    # group made before torch.distributed.fsdp is first imported, as run_workers' own would be, is kept
    # by torch itself: torch._dynamo imports it while the model is checked.) One spawn checks both.
    if os.path.isdir("/proc/self/task"):  # counts threads through /proc (Linux)
        run_workers(train_then_no_gloo_threads, 4, cfg_path, run4, True, init_group=False)
    else:
        run_workers(train_run, 4, cfg_path, run4, True, None)
    assert _assert_same_run(run4, ref)["world_size"] == 4
    assert not [n for n in os.listdir(os.path.join(run4, "checkpoints")) if n.endswith(".tmp")]
