"""JSON-lines files (a run's metrics.jsonl, a sweep's results.jsonl): one reader, one way to say that
a file is damaged.

A line that does not parse, or that the caller does not accept as a record, is skipped and its
number kept. A cut last line is what a kill leaves in a file appended line by line: callers that
append (metrics.jsonl) pass over it in silence, callers whose file is rewritten whole
(results.jsonl, temp file + rename) have none and say every bad line.

    lines = read_json_lines(path, accept=lambda rec: "run" in rec)
    if lines.bad:
        say_damaged(path, lines.bad, "are not result records and were skipped")

A run's metrics are committed as metrics.jsonl.xz (experiments/results: ~4x smaller than the plain
file, which counts against the device machine's cap on the copied tree), so a reader of a finished
run finds its file with ``run_metrics_path`` and ``read_json_lines`` reads either form. An .xz file
is written whole (temp file + rename), so a damaged one is not a kill's cut line: it is an error
(DamagedFile, a ValueError) that names the file.
"""

from __future__ import annotations

import json
import lzma
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class JsonLines:
    """What ``read_json_lines`` found: the accepted records in file order, the 1-based numbers of
    the non-empty lines that were skipped, and the number of the last non-empty line (0: none)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    bad: list[int] = field(default_factory=list)
    last: int = 0

    def damaged(self) -> list[int]:
        """The skipped lines other than a cut last line (a kill mid-append leaves one)."""
        return [n for n in self.bad if n != self.last]


class DamagedFile(ValueError):
    """A file that cannot be read at all (a damaged .xz): unlike a damaged line, nothing of it is
    usable, so readers that pass over a missing log (read_metrics_if_logged) let this through."""


METRICS_FILE = "metrics.jsonl"  # what torchpeer train appends to (torchpeer/lm/metrics.py)
METRICS_XZ = METRICS_FILE + ".xz"  # a committed copy of it (experiments/results.py: copy_results)


def run_metrics_path(run_dir: str) -> str | None:
    """RUN_DIR/metrics.jsonl, else RUN_DIR/metrics.jsonl.xz, else None. The plain file comes first:
    it is the one a run appends to, so where both exist it is the newer."""
    for name in (METRICS_FILE, METRICS_XZ):
        if os.path.isfile(path := os.path.join(run_dir, name)):
            return path
    return None


def write_xz_copy(src: str, dest: str) -> None:
    """DEST := the log ``src`` xz-compressed (an .xz source is copied as it is), written atomically
    (temp file + rename): how a run's log is committed (experiments/results.py, benchmarks/lm_compare.py)."""
    import shutil

    from torchpeer.data.atomic import atomic_open

    with open(src, "rb") as fin, atomic_open(dest, "wb") as fout:
        if src.endswith(".xz"):
            shutil.copyfileobj(fin, fout)
        else:
            # xz's default preset (6): a log (~20-100 KB) fits its 8 MiB window whole, so 9 or EXTREME
            # gain nothing (measured on the committed logs); closing xz leaves fout open
            with lzma.open(fout, "wb") as xz:
                shutil.copyfileobj(fin, xz)


def read_json_lines(path: str, accept: Callable[[dict[str, Any]], bool] | None = None) -> JsonLines:
    """Read ``path`` (it must exist; a name ending in .xz is read through lzma); a record is a JSON
    object on one line that ``accept`` (if given) returns True for. Undecodable bytes are replaced,
    not fatal: the line is then skipped. A damaged .xz file: DamagedFile (a ValueError) naming it."""
    out = JsonLines()
    opener = lzma.open if path.endswith(".xz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                out.last = number
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    out.bad.append(number)
                    continue
                if isinstance(rec, dict) and (accept is None or accept(rec)):
                    out.records.append(rec)
                else:
                    out.bad.append(number)
    except (lzma.LZMAError, EOFError) as e:  # EOFError: the stream ends early (a cut or partial copy)
        raise DamagedFile(
            f"{path} is a damaged xz file ({e}); restore it, e.g. git checkout -- {path} (a committed run)"
        ) from None
    return out


def say_damaged(path: str, lines: list[int], what: str) -> None:
    """One warning line on stderr: ``warning: PATH: line(s) 2, 5 WHAT`` (at most 10 numbers)."""
    numbers = ", ".join(map(str, lines[:10])) + (" ..." if len(lines) > 10 else "")
    print(f"warning: {path}: line(s) {numbers} {what}", file=sys.stderr)
