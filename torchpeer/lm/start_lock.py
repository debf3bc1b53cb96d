"""Memory checks of runs starting together on one GPU: each sees what the others will take.

Why: ``check_fits`` (memory.py) compares a run's estimate with the memory free *now*. Runs that
start together on one GPU (``torchpeer sweep --parallel N``, or two sweeps in one device job) all
see the empty GPU, all pass, and the last to allocate fails with an out-of-memory error minutes
later, losing its progress.

How: a reservation ledger per GPU. A run's check, under a short ``fcntl.flock`` on the file named
by the environment variable ``TORCHPEER_START_LOCK`` (the sweep sets it per GPU; unset: no lock and
no ledger, as for a single ``train``), subtracts the estimates that the other starting runs have
reserved in ``<lock>.reservations.json`` from the free memory, and when its own estimate fits it
adds its own reservation and lets go of the lock at once. The reservation stays until the run's
first training step has allocated what it holds (the caching allocator keeps it reserved), then
``release()`` removes it. So runs that clearly fit start side by side; only a run that does not
fit beside the others' reservations waits, for those first steps to end (then their real use is
in the free memory and counted once), at most ``timeout`` seconds, before its check decides with
what is there. A reservation whose process has died is dropped.

The previous design held the lock from the check to the end of the first step: on the H200
(2026-12-05) four of five runs started together waited 55-70 s behind first steps that compiled.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

ENV = "TORCHPEER_START_LOCK"
POLL_SECONDS = 0.25
STALE_SECONDS = 3600.0  # a reservation this old is dropped even if its pid is alive (pid reuse)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class StartLock:
    """One starting run's place in the GPU's ledger (a no-op when ``path`` is None).

    check(fits): the memory check against the free memory less the others' reservations, then this
    run's reservation; release(): drop it (idempotent). acquire()/unlock(): the short flock itself."""

    def __init__(self, path: str | None, timeout: float = 120.0):
        self.path, self.timeout = path, timeout
        self._fd: int | None = None
        self.reserved = 0  # bytes this run has in the ledger
        self.waited = 0.0  # seconds spent waiting (for the flock or for others' first steps)
        self.timed_out = False

    @classmethod
    def from_env(cls, timeout: float = 120.0) -> StartLock:
        return cls(os.environ.get(ENV) or None, timeout)

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def ledger_path(self) -> str | None:
        return None if self.path is None else self.path + ".reservations.json"

    # ------------------------------------------------------------------ the flock (held briefly)

    def acquire(self, timeout: float | None = None) -> StartLock:
        """Take the flock, waiting up to ``timeout`` s (default: self.timeout); returns self."""
        if self.path is None or self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (the memory check still runs)
            return self
        limit = self.timeout if timeout is None else timeout
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                break
            except BlockingIOError:
                if time.monotonic() - t0 >= limit:
                    os.close(fd)
                    self.timed_out = True
                    break
                time.sleep(POLL_SECONDS)
        self.waited += time.monotonic() - t0
        return self

    def unlock(self) -> None:
        if self._fd is None:
            return
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    # ------------------------------------------------------------------ the ledger (under the flock)

    def _read(self) -> dict[str, dict]:
        """Live reservations {pid: {"bytes", "time"}}; dead or stale ones, and a damaged file, dropped."""
        try:
            with open(self.ledger_path, encoding="utf-8") as fh:
                entries = json.load(fh)
            if not isinstance(entries, dict):
                return {}
        except (OSError, ValueError):
            return {}
        now = time.time()
        return {
            pid: e
            for pid, e in entries.items()
            if isinstance(e, dict)
            and str(pid).isdigit()
            and isinstance(e.get("bytes"), int)
            and now - float(e.get("time", 0)) < STALE_SECONDS
            and _alive(int(pid))
        }

    def _write(self, entries: dict[str, dict]) -> None:
        tmp = f"{self.ledger_path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(entries, fh)
        os.replace(tmp, self.ledger_path)  # readers see the old ledger or the new one, never half

    def others(self) -> int:
        """Bytes reserved by the other starting runs on this GPU (0 without a ledger)."""
        if self.path is None:
            return 0
        mine = str(os.getpid())
        return sum(e["bytes"] for pid, e in self._read().items() if pid != mine)

    def reserve(self, nbytes: int) -> None:
        """Put this run's ``nbytes`` in the ledger (call with the flock held)."""
        entries = self._read()
        entries[str(os.getpid())] = {"bytes": int(nbytes), "time": time.time()}
        self._write(entries)
        self.reserved = int(nbytes)

    def reserve_for(self, pid: int, nbytes: int) -> bool:
        """Reserve ``nbytes`` for another process ``pid`` that has not checked yet (the sweep does this
        for a run it has just started and that must go first: one resuming a checkpoint, or one that
        waited for memory), so runs started after it count its memory as taken even if their checks
        come first. Its own check does not count its own entry, and replaces it (same pid); a dead
        pid's entry is dropped like any other. Takes the flock itself; False when it could not."""
        if self.path is None:
            return False
        self.acquire(timeout=10.0)
        try:
            if not self.held:
                return False
            entries = self._read()
            entries[str(int(pid))] = {"bytes": int(nbytes), "time": time.time()}
            self._write(entries)
            return True
        finally:
            self.unlock()

    # ------------------------------------------------------------------ what the trainer calls

    def check(self, fits: Callable[[int], object], say: Callable[[str], None] | None = None):
        """Run ``fits(reserved)`` (the memory check with ``reserved`` bytes of the free memory taken
        by the others' reservations; it raises MemoryFitError when the step does not fit) and
        reserve this run's estimate (``.total`` of what fits returns). While the step does not fit
        beside outstanding reservations, wait for them to clear (up to ``timeout`` s), then check
        against what is free. Returns what ``fits`` returned."""
        from torchpeer.lm.memory import MemoryFitError

        if self.path is None:
            return fits(0)
        t0 = time.monotonic()
        waiting_for_others = False
        try:
            while True:
                self.acquire()
                if not self.held:  # the flock timed out: check without the ledger
                    return fits(0)
                reserved = self.others()
                try:
                    est = fits(reserved)
                except MemoryFitError:
                    if reserved == 0 or time.monotonic() - t0 >= self.timeout:
                        raise
                    waiting_for_others = True
                    self.unlock()
                    time.sleep(POLL_SECONDS)
                    continue
                total = getattr(est, "total", None)
                if isinstance(total, int) and total > 0:
                    self.reserve(total)
                return est
        finally:
            self.unlock()
            self.waited = time.monotonic() - t0
            if say is not None and (waiting_for_others or self.waited >= 1.0):
                say(
                    f"start lock: waited {self.waited:.0f} s for the runs starting before this one "
                    "(their reserved memory, until their first step)"
                )

    def release(self) -> None:
        """Drop this run's reservation (its first step has allocated what it holds); idempotent."""
        if self.path is None or not self.reserved:
            self.unlock()
            return
        self.acquire(timeout=10.0)
        try:
            if self.held:  # else leave it: a write without the flock could drop another's entry
                entries = self._read()
                entries.pop(str(os.getpid()), None)
                self._write(entries)
        finally:
            self.unlock()
            self.reserved = 0
