"""One training process per run folder: an advisory lock on ``RUN_DIR/.lock``.

Why: two processes training into one folder (a ``--resume`` typed twice, a sweep started again
while its first copy still runs) both resume from the same step and interleave their checkpoints
and metrics.jsonl; worse, the second one's start deletes partial checkpoints (rundir.py) that the
first one is writing. The trainer (rank 0 only under torchrun) takes this lock before it touches
the folder (before its start cleans up, or, for a new folder, as it creates it) and keeps it to the
end of the run; a second trainer fails at once with one line naming the process that holds it.

How: ``fcntl.flock`` on an open file, so the lock ends with the process that held it, however it
ends (kill -9 included): a leftover ``.lock`` file is never stale. The file stays empty and is never
written after its creation, so a command that changes nothing in a run folder (a resume refused
for a bad override, a resume of a finished run) leaves every byte and time stamp as it was. Where
flock is not available (Windows) or not supported by the file system (some network mounts), runs
are not locked (no false refusals).
"""

from __future__ import annotations

import os

LOCK_NAME = ".lock"


class RunFolderBusy(ValueError):
    """Another process holds the run folder's lock. One line: which process, and what to do."""


class RunFolderLock:
    """The lock of one run folder: ``hold()`` takes it, ``release()`` ends it (both idempotent)."""

    def __init__(self, run_dir: str, option: str = "--run-dir"):
        self.run_dir, self.option = run_dir, option
        self._fh = None

    @property
    def held(self) -> bool:
        return self._fh is not None

    @classmethod
    def take(cls, run_dir: str, option: str = "--run-dir") -> RunFolderLock:
        """The held lock of ``run_dir`` (an existing folder), or RunFolderBusy."""
        return cls(run_dir, option).hold()

    def hold(self, enabled: bool = True) -> RunFolderLock:
        """Take the lock unless held already, ``enabled`` is False (torchrun's ranks > 0) or the folder
        does not exist yet (the trainer calls this again when it creates it); RunFolderBusy if taken."""
        if self._fh is not None or not enabled or not os.path.isdir(self.run_dir):
            return self
        try:
            import fcntl
        except ImportError:  # no flock on this platform: unlocked
            return self
        try:
            fh = open(os.path.join(self.run_dir, LOCK_NAME), "a", encoding="utf-8")  # noqa: SIM115 (the lock is the open file)
        except OSError:  # cannot create it (the folder's own checks say why, when a write matters)
            return self
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RunFolderBusy(
                f"{self.run_dir} is in use by another training process (it holds {LOCK_NAME} there; `fuser -v` on "
                "that file names it); two runs in one folder would overwrite each other's checkpoints: wait for it "
                f"to end or stop it, or choose another {self.option}"
            ) from None
        except OSError:  # the file system does not support flock: unlocked, as without fcntl
            fh.close()
            return self
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is None:
            return
        fh, self._fh = self._fh, None
        fh.close()  # closing the file drops the flock


def check_not_in_use(run_dir: str, option: str = "--run-dir") -> None:
    """RunFolderBusy when a training process holds ``run_dir`` now (e.g. before saying "nothing to
    resume" of a run that is still before its first checkpoint); otherwise nothing is held after."""
    RunFolderLock.take(run_dir, option).release()
