"""Atomic file writes: write a temp file next to the target, then os.replace it.

A reader (or a concurrent writer, e.g. another DDP rank) never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_open(path: str, mode: str = "wb"):
    """Open a temp file in path's folder; on success it replaces ``path``, on error it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        plain_file_mode(tmp)  # mkstemp creates 0600; token files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def plain_file_mode(path: str) -> None:
    """Give ``path`` the mode ``open(path, "w")`` would have (0o666 less the umask, e.g. 0644).

    For files that a writer creates private (mkstemp, safetensors: 0600), so that a checkpoint or
    an exported model can be read by the other users who can read its folder."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_text_atomic(path: str, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
