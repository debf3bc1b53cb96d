"""One process at a time between the memory check and the end of its first training step.

Why: ``check_fits`` (memory.py) compares a run's estimate with the memory free *now*. Runs that
start together on one GPU (``torchpeer sweep --parallel N``, or two sweeps in one device job) all
see the empty GPU, all pass, and the last to allocate fails with an out-of-memory error minutes
later, losing its progress. Holding a lock from before the check until the first optimizer step
has allocated the parameters, gradients, optimizer state and the step's activations (the caching
allocator keeps them reserved) lets the next run's check see what the earlier ones really use.

The lock is an advisory ``fcntl.flock`` on a file named by the environment variable
``TORCHPEER_START_LOCK`` (the sweep sets it per GPU; unset: no lock, as for a single ``train``).
The kernel drops it when the process exits, crashed or not. A process waits at most ``timeout``
seconds (a compiling first step can take minutes), then goes on without it.
"""

from __future__ import annotations

import os
import time

ENV = "TORCHPEER_START_LOCK"
POLL_SECONDS = 0.25


class StartLock:
    """Held from ``acquire()`` to ``release()`` (idempotent; a no-op when ``path`` is None)."""

    def __init__(self, path: str | None, timeout: float = 120.0):
        self.path, self.timeout = path, timeout
        self._fd: int | None = None
        self.waited = 0.0  # seconds spent waiting in acquire()
        self.timed_out = False

    @classmethod
    def from_env(cls, timeout: float = 120.0) -> StartLock:
        return cls(os.environ.get(ENV) or None, timeout)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, say=None) -> StartLock:
        """Take the lock, waiting up to ``timeout`` s; returns self (held, or not after a timeout).
        say: called with one line when it waited a second or more, or gave up."""
        if self.path is None or self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (the memory check still runs)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                break
            except BlockingIOError:
                if time.monotonic() - t0 >= self.timeout:
                    os.close(fd)
                    self.timed_out = True
                    break
                time.sleep(POLL_SECONDS)
        self.waited = time.monotonic() - t0
        if say is not None and (self.timed_out or self.waited >= 1.0):
            how = "gave up waiting" if self.timed_out else "waited"
            say(f"start lock: {how} {self.waited:.0f} s for the runs starting before this one")
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
