"""The start lock (torchpeer/lm/start_lock.py): runs starting together on one device check their
memory against the free memory less the others' reservations, each reservation held until that
run's first step; a run that fits beside them starts at once, one that does not waits for them
(up to its timeout); a dead run's reservation is dropped; the flock itself is held only briefly."""

import contextlib
import json
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from tests.lm.helpers import write_config, write_corpus
from torchpeer.lm import Callback
from torchpeer.lm.config_io import load_config
from torchpeer.lm.memory import MemoryFitError
from torchpeer.lm.start_lock import ENV, StartLock
from torchpeer.lm.train import train

GIB = 2**30


def fits_in(free: int, need: int):
    """A memory check of a step needing ``need`` bytes with ``free`` bytes free (less the reserved)."""

    def fits(reserved):
        if need > free - reserved:
            raise MemoryFitError("no room", needed=need, available=free - reserved, capacity=free)
        return SimpleNamespace(total=need)

    return fits


@contextlib.contextmanager
def reserving(path, nbytes):
    """A process that reserves ``nbytes`` in the ledger at ``path``, then drops its reservation when
    it reads a line on stdin; killed on leaving. It loads start_lock.py by file (no torch import:
    starts in ~50 ms)."""
    import torchpeer.lm.start_lock as module

    code = (
        "import importlib.util as u, sys; "
        f"spec = u.spec_from_file_location('start_lock', {module.__file__!r}); m = u.module_from_spec(spec); "
        f"spec.loader.exec_module(m); lock = m.StartLock({path!r}).acquire(); lock.reserve({nbytes}); "
        "lock.unlock(); print('reserved', flush=True); sys.stdin.readline(); lock.release(); "
        "print('released', flush=True)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "reserved"
        yield child
    finally:
        child.kill()
        child.wait()


def test_a_run_that_fits_beside_the_reservations_starts_at_once(tmp_path):
    path = str(tmp_path / "gpu0.lock")
    with reserving(path, 30 * GIB) as first:
        second = StartLock(path, timeout=5)
        assert second.others() == 30 * GIB
        est = second.check(fits_in(free=100 * GIB, need=60 * GIB))  # 60 <= 100 - 30
        assert est.total == 60 * GIB and second.waited < 1.0 and not second.held
        with open(second.ledger_path) as fh:
            assert sorted(json.load(fh)) == sorted([str(first.pid), str(os.getpid())])
        second.release()
        with open(second.ledger_path) as fh:
            assert list(json.load(fh)) == [str(first.pid)]


def test_a_run_that_does_not_fit_beside_them_waits_for_their_first_step(tmp_path):
    path = str(tmp_path / "gpu0.lock")
    with reserving(path, 50 * GIB) as first:
        timer = threading.Timer(0.6, lambda: (first.stdin.write("\n"), first.stdin.flush()))
        timer.start()
        second = StartLock(path, timeout=10)
        said = []
        second.check(fits_in(free=100 * GIB, need=60 * GIB), say=said.append)  # 60 > 100 - 50 until released
        assert 0.5 <= second.waited < 5 and "waited" in said[0]
        assert first.stdout.readline().strip() == "released"
        second.release()
    # with nothing reserved, a step that does not fit is refused at once (the pool's "not now")
    with pytest.raises(MemoryFitError):
        StartLock(path, timeout=10).check(fits_in(free=10 * GIB, need=60 * GIB))
    # a reservation that never clears: refused after the timeout
    with reserving(path, 50 * GIB):
        late = StartLock(path, timeout=0.5)
        with pytest.raises(MemoryFitError):
            late.check(fits_in(free=100 * GIB, need=60 * GIB))
        assert late.waited >= 0.5


def test_a_dead_runs_reservation_is_dropped(tmp_path):
    path = str(tmp_path / "gpu0.lock")
    with reserving(path, 50 * GIB):
        assert StartLock(path).others() == 50 * GIB
    assert StartLock(path).others() == 0  # killed: its reservation is dropped
    with open(path + ".reservations.json", "w") as fh:  # a damaged ledger counts as empty
        fh.write("{not json")
    assert StartLock(path).others() == 0


def test_no_path_is_no_lock(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    lock = StartLock.from_env()
    assert lock.check(lambda r: SimpleNamespace(total=r + 7)).total == 7
    assert not lock.held and lock.others() == 0
    lock.release()


class LockProbe(Callback):
    """At the start of training and after each step: (this run's reservation in the ledger, whether
    another process could take the flock)."""

    def __init__(self, path):
        self.path, self.seen = path, {}

    def _look(self, key):
        with open(self.path + ".reservations.json") as fh:
            mine = json.load(fh).get(str(os.getpid()), {}).get("bytes", 0)
        other = StartLock(self.path).acquire(timeout=0)
        self.seen[key] = (mine > 0, other.held)
        other.unlock()

    def on_train_start(self, trainer):
        self._look("start")

    def on_step_end(self, trainer, step, metrics):
        self._look(step)


def test_training_reserves_its_estimate_until_its_first_step(tmp_path, monkeypatch):
    path = str(tmp_path / "gpu0.lock")
    monkeypatch.setenv(ENV, path)
    write_corpus(tmp_path, train_lines=300, valid_lines=20)
    cfg = load_config(write_config(tmp_path, max_steps=3), ["--data.valid", "{}", "--train.checkpoint", "false"])
    probe = LockProbe(path)
    train(cfg, str(tmp_path / "run"), progress=False, callbacks=[probe])
    # reserved from the memory check to the end of the first step; the flock free all along
    assert probe.seen == {"start": (True, True), 1: (False, True), 2: (False, True), 3: (False, True)}


def test_a_failed_build_leaves_no_reservation_and_no_lock(tmp_path, monkeypatch):
    path = str(tmp_path / "gpu0.lock")
    monkeypatch.setenv(ENV, path)
    write_corpus(tmp_path, train_lines=300, valid_lines=20)
    cfg = load_config(write_config(tmp_path, max_steps=3), ["--data.valid", "{}"])

    def refuse(*a, **kw):
        assert not StartLock(path).acquire(timeout=0).held  # the check runs under the flock
        raise MemoryFitError("no room", needed=2, available=1, capacity=None)

    monkeypatch.setattr("torchpeer.lm.memory.check_fits", refuse)
    with pytest.raises(MemoryFitError):
        train(cfg, str(tmp_path / "run"), progress=False)
    assert StartLock(path).acquire(timeout=0).held
    assert StartLock(path).others() == 0 and not os.path.exists(path + ".reservations.json")


def test_the_sweep_reserves_for_a_run_it_has_just_started(tmp_path):
    """reserve_for(pid, n): an entry under another live process's pid (the sweep's for a worker that
    goes first) that every other run counts, and that lapses when that process ends."""
    path = str(tmp_path / "gpu.lock")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert StartLock(path).reserve_for(proc.pid, 5 * GIB)
        assert StartLock(path).others() == 5 * GIB  # this process's view: someone else's reservation
        with open(path + ".reservations.json") as fh:
            assert json.load(fh)[str(proc.pid)]["bytes"] == 5 * GIB
    finally:
        proc.kill()
        proc.wait()
    assert StartLock(path).others() == 0  # a dead pid's entry is dropped
    assert StartLock(None).reserve_for(proc.pid, GIB) is False  # no lock path: nothing to reserve in
