"""The start lock (torchpeer/lm/start_lock.py): runs that start together on one device pass the
memory check one at a time, each holding the lock from before the check to the end of its first
step; a waiter gives up after its timeout; the kernel drops a dead holder's lock."""

import subprocess
import sys
import time

from tests.lm.helpers import write_config, write_corpus
from torchpeer.lm import Callback
from torchpeer.lm.config_io import load_config
from torchpeer.lm.start_lock import ENV, StartLock
from torchpeer.lm.train import train


def test_a_second_holder_waits_until_release_or_timeout(tmp_path):
    path = str(tmp_path / "gpu0.lock")
    first = StartLock(path).acquire()
    assert first.held
    second = StartLock(path, timeout=0.3).acquire()
    assert not second.held and second.timed_out and second.waited >= 0.3
    first.release()
    first.release()  # idempotent
    third = StartLock(path, timeout=0.3).acquire()
    assert third.held and not third.timed_out and third.waited < 0.3
    third.release()


def test_no_path_is_no_lock(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    lock = StartLock.from_env().acquire()
    assert not lock.held and not lock.timed_out
    lock.release()


def test_a_dead_holders_lock_is_dropped(tmp_path):
    path = str(tmp_path / "gpu0.lock")
    code = (
        f"import time; from torchpeer.lm.start_lock import StartLock; StartLock({path!r}).acquire(); "
        "print('held', flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert StartLock(path, timeout=0.2).acquire().timed_out
    finally:
        holder.kill()
        holder.wait()
    t0 = time.monotonic()
    lock = StartLock(path, timeout=5).acquire()
    assert lock.held and time.monotonic() - t0 < 2
    lock.release()


class LockProbe(Callback):
    """Whether another process could take the lock at the start of training and after each step."""

    def __init__(self, path):
        self.path, self.free = path, {}

    def _try(self, key):
        other = StartLock(self.path, timeout=0).acquire()
        self.free[key] = other.held
        other.release()

    def on_train_start(self, trainer):
        self._try("start")

    def on_step_end(self, trainer, step, metrics):
        self._try(step)


def test_training_holds_the_lock_until_its_first_step(tmp_path, monkeypatch):
    path = str(tmp_path / "gpu0.lock")
    monkeypatch.setenv(ENV, path)
    write_corpus(tmp_path, train_lines=300, valid_lines=20)
    cfg = load_config(write_config(tmp_path, max_steps=3), ["--data.valid", "{}", "--train.checkpoint", "false"])
    probe = LockProbe(path)
    train(cfg, str(tmp_path / "run"), progress=False, callbacks=[probe])
    # held from before the memory check (so also when training starts), free once the first step ran
    assert probe.free == {"start": False, 1: True, 2: True, 3: True}


def test_a_failed_build_releases_the_lock(tmp_path, monkeypatch):
    from torchpeer.lm.memory import MemoryFitError

    path = str(tmp_path / "gpu0.lock")
    monkeypatch.setenv(ENV, path)
    write_corpus(tmp_path, train_lines=300, valid_lines=20)
    cfg = load_config(write_config(tmp_path, max_steps=3), ["--data.valid", "{}"])

    def refuse(*a, **kw):
        assert not StartLock(path, timeout=0).acquire().held  # the check runs under the lock
        raise MemoryFitError("no room", needed=2, available=1, capacity=None)

    monkeypatch.setattr("torchpeer.lm.memory.check_fits", refuse)
    try:
        train(cfg, str(tmp_path / "run"), progress=False)
    except MemoryFitError:
        pass
    else:
        raise AssertionError("the refusal did not propagate")
    assert StartLock(path, timeout=0).acquire().held
