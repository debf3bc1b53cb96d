"""The files of a checkpoint folder: readable by whoever can read the run folder, like every other
file torchpeer writes (safetensors creates its file 0600)."""

import os
import stat

import pytest
import torch

from tests.lm.test_model import tiny
from torchpeer.lm.checkpoint import load_model_from_checkpoint, save_checkpoint
from torchpeer.lm.config import RunConfig
from torchpeer.lm.model import TransformerLM


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_checkpoint_weights_have_the_mode_of_the_other_files(tmp_path):
    cfg = RunConfig()
    cfg.model = tiny("peer")
    cfg.train.max_steps = 3
    model = TransformerLM(cfg.model)
    old = os.umask(0o022)
    try:
        ckpt = save_checkpoint(str(tmp_path / "run"), 3, model, {}, cfg)
    finally:
        os.umask(old)
    assert _mode(os.path.join(ckpt, "model.safetensors")) == 0o644
    assert _mode(os.path.join(ckpt, "model.safetensors")) == _mode(os.path.join(ckpt, "config.json"))
    loaded, _, _ = load_model_from_checkpoint(ckpt)  # still intact: the mode is set before checksums.json
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())


def test_a_checkpoint_without_trainer_pt_is_named_damaged_not_missing(tmp_path, capsys):
    """trainer.pt deleted (e.g. to save space): the folders are still the run's checkpoints, so eval
    names the missing file instead of "not a run folder", and a new run is not started over them."""
    from torchpeer.cli import main

    cfg = RunConfig()
    cfg.model, cfg.train.max_steps = tiny("peer"), 4
    run = str(tmp_path / "run")
    model = TransformerLM(cfg.model)
    for step in (2, 4):
        os.remove(os.path.join(save_checkpoint(run, step, model, {}, cfg), "trainer.pt"))
    ckpts = os.path.join(run, "checkpoints")
    assert main(["eval", os.path.join(ckpts, "step_00000004")]) == 2
    assert capsys.readouterr().err == f"error: checkpoint {ckpts}/step_00000004 is damaged: trainer.pt is missing\n"
    assert main(["eval", run]) == 2
    why = "step_00000004: trainer.pt is missing; step_00000002: trainer.pt is missing"
    assert capsys.readouterr().err == f"error: no intact checkpoint in {run}: {why}\n"
    assert main(["train", "--resume", "--run-dir", run]) == 2
    assert capsys.readouterr().err == (
        f"error: cannot resume {run}: no intact checkpoint ({why}); nothing was changed: to start the run anew, "
        f"give another --run-dir, or move this folder aside (mv {run} {run}.damaged) and train into {run} again\n"
    )
    assert main(["train", "--run-dir", run, "--train.max_steps", "2"]) == 2  # not a new run over them
    assert "already holds checkpoints (latest: step_00000004); pass --resume" in capsys.readouterr().err
    assert sorted(os.listdir(ckpts)) == ["step_00000002", "step_00000004"]


def test_a_runs_checkpoints_folder_names_the_run_and_its_newest_checkpoint(tmp_path, capsys, monkeypatch):
    """`torchpeer eval runs/x/checkpoints` said "neither a checkpoint folder nor a run folder": it names
    the run folder and the newest step_* folder to give instead."""
    from torchpeer.cli import main

    cfg = RunConfig()
    cfg.model, cfg.train.max_steps = tiny("peer"), 4
    model = TransformerLM(cfg.model)
    for step in (2, 4):
        save_checkpoint(str(tmp_path / "run"), step, model, {}, cfg)
    monkeypatch.chdir(tmp_path)
    given, newest = os.path.join("run", "checkpoints"), os.path.join("run", "checkpoints", "step_00000004")
    assert main(["eval", given]) == 2
    assert capsys.readouterr().err == (
        f"error: {given!r} is the checkpoints folder of the run folder 'run', not one checkpoint: give the "
        f"run folder (its newest intact checkpoint is used) or one checkpoint, e.g. the newest, {newest!r}\n"
    )
    monkeypatch.chdir(tmp_path / "run")
    assert main(["eval", "checkpoints"]) == 2
    assert "of the run folder '.', not one checkpoint" in capsys.readouterr().err


def test_pruning_keeps_a_checkpoint_stripped_by_hand(tmp_path):
    """Only checkpoints as written are pruned (keep the newest K); one whose trainer.pt was removed by
    hand, to keep its weights, stays as it was before checksums.json made it visible."""
    cfg = RunConfig()
    cfg.model, cfg.train.max_steps = tiny("dense"), 9
    run = str(tmp_path / "run")
    model = TransformerLM(cfg.model)
    os.remove(os.path.join(save_checkpoint(run, 1, model, {}, cfg, keep=2), "trainer.pt"))
    for step in (2, 3, 4):
        save_checkpoint(run, step, model, {}, cfg, keep=2)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_00000001", "step_00000003", "step_00000004"]


def test_a_full_disk_deletes_the_checkpoints_to_be_pruned_before_the_save(tmp_path, monkeypatch, capsys):
    """With room for one more checkpoint the old ones go after the new one is complete; on a disk
    with less free space than a checkpoint takes, the ones the save would prune go first (and it
    says so), so the save does not fail; the keep newest are what remains either way."""
    import shutil
    from collections import namedtuple

    import torchpeer.lm.checkpoint as ckpt_io

    cfg = RunConfig()
    cfg.model, cfg.train.max_steps = tiny("dense"), 9
    run = str(tmp_path / "run")
    model = TransformerLM(cfg.model)
    root = os.path.join(run, "checkpoints")
    present_at_write = []
    real_save_model = ckpt_io.save_model

    def spy(model, path):
        present_at_write.append(sorted(n for n in os.listdir(root) if n.startswith("step_")))
        return real_save_model(model, path)

    monkeypatch.setattr(ckpt_io, "save_model", spy)
    for step in (1, 2):
        save_checkpoint(run, step, model, {}, cfg, keep=1)
    assert present_at_write == [[], ["step_00000001"]] and "disk nearly full" not in capsys.readouterr().out
    assert sorted(os.listdir(root)) == ["step_00000002"]

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    save_checkpoint(run, 3, model, {}, cfg, keep=1)
    assert present_at_write[-1] == []  # step 2 went before step 3 was written
    assert "disk nearly full" in capsys.readouterr().out and sorted(os.listdir(root)) == ["step_00000003"]
    save_checkpoint(run, 4, model, {}, cfg, keep=2)  # keep 2: nothing would be pruned, nothing goes
    save_checkpoint(run, 5, model, {}, cfg, keep=2)  # step 3 would be pruned after: it goes before
    assert present_at_write[-2:] == [["step_00000003"], ["step_00000004"]]
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000005"]


def test_a_sharded_checkpoint_makes_room_too(tmp_path, monkeypatch, capsys):
    """A sharded (DCP) checkpoint keeps its weights in dcp/: make_room counts them (it counted only
    the folder's top-level files, a few KB, so a full disk never made room) and the DCP save calls
    it before writing, as the one-process save does."""
    import shutil
    import warnings
    from collections import namedtuple

    pytest.importorskip("torch.distributed.checkpoint")
    from torchpeer.lm.checkpoint import folder_bytes
    from torchpeer.parallel.checkpoint import save_dcp_checkpoint

    cfg = RunConfig()
    cfg.model, cfg.train.max_steps = tiny("dense"), 9
    run = str(tmp_path / "run")
    model = TransformerLM(cfg.model)
    root = os.path.join(run, "checkpoints")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP: "torch.distributed is ... uninitialized" (one process)
        first = save_dcp_checkpoint(run, 1, model, None, {}, cfg, None, keep=1)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert folder_bytes(first) >= weights  # the shards in dcp/ are counted
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - weights // 2, weights // 2))
        real_save = torch.distributed.checkpoint.save
        present_at_write = []

        def spy(*a, **kw):
            present_at_write.append(sorted(n for n in os.listdir(root) if n.startswith("step_")))
            return real_save(*a, **kw)

        monkeypatch.setattr(torch.distributed.checkpoint, "save", spy)
        save_dcp_checkpoint(run, 2, model, None, {}, cfg, None, keep=1)
    assert present_at_write == [[]]  # step 1 went before step 2 was written
    assert "disk nearly full" in capsys.readouterr().out and sorted(os.listdir(root)) == ["step_00000002"]
