"""One trainer per run folder (torchpeer/lm/run_lock.py): a second trainer on a folder in use fails
at once with one line and leaves the folder as it was; the lock ends with its holder, even a killed one."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.lm.helpers import cli_subprocess, write_config, write_corpus
from torchpeer.cli import main
from torchpeer.lm.config_io import load_config
from torchpeer.lm.run_lock import LOCK_NAME, RunFolderBusy, RunFolderLock
from torchpeer.lm.train import train

HOLD = (  # keeps the lock object: the lock lives as long as its open file
    "import sys, time; from torchpeer.lm.run_lock import RunFolderLock; "
    "lock = RunFolderLock.take(sys.argv[1]); print('held', flush=True); time.sleep(60)"
)


def _holder(run_dir):
    """A separate process that holds the folder's lock until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_holder_is_refused_and_the_lock_ends_with_its_process(tmp_path):
    run = str(tmp_path / "run")
    os.makedirs(run)
    p = _holder(run)
    try:
        with pytest.raises(RunFolderBusy, match=r"in use by another training process \(it holds \.lock there"):
            RunFolderLock.take(run)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    lock = RunFolderLock.take(run)  # a killed holder leaves the file, not the lock
    assert lock.held and os.path.getsize(os.path.join(run, LOCK_NAME)) == 0  # never written: no change to a folder
    with pytest.raises(RunFolderBusy):  # also within one process: a second open file is a second holder
        RunFolderLock.take(run)
    lock.release()
    lock.release()  # idempotent
    RunFolderLock.take(run).release()


def test_trainer_refuses_a_folder_in_use_before_touching_it(tmp_path):
    write_corpus(tmp_path)
    cfg = load_config(write_config(tmp_path, max_steps=6))
    run = str(tmp_path / "run")
    train(cfg, run, progress=False)
    partial = os.path.join(run, "checkpoints", ".step_00000007.abc.tmp")  # as a running save leaves it
    os.makedirs(partial)
    before = sorted(os.listdir(run))
    p = _holder(run)
    try:
        with pytest.raises(RunFolderBusy, match="wait for it to end or stop it, or choose another --run-dir"):
            train(load_config(write_config(tmp_path, max_steps=9)), run, resume=True, progress=False)
        assert os.path.isdir(partial)  # the start's cleanup did not run under another's feet
        assert sorted(os.listdir(run)) == before
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    summary = train(load_config(write_config(tmp_path, max_steps=9)), run, resume=True, progress=False)
    assert summary["steps"] == 9 and not os.path.exists(partial)
    RunFolderLock.take(run).release()  # the finished run let go of it


def test_cli_second_train_in_a_folder_in_use_is_one_line(tmp_path, capsys):
    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=100_000)
    run = str(tmp_path / "run")
    p = cli_subprocess("train", cfg, "--run-dir", run)
    try:
        metrics = os.path.join(run, "metrics.jsonl")
        for _ in range(2400):  # the first process is training once its metrics log exists
            if os.path.exists(metrics) or p.poll() is not None:
                break
            time.sleep(0.05)
        assert p.poll() is None, "the first training process ended early"
        for resume in (["--resume"], []):  # before its first checkpoint: not "nothing to resume"
            assert main(["train", cfg, "--run-dir", run, *resume]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "in use by another training process" in err[0] and "--run-dir" in err[0]
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
