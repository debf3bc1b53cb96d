"""Checkpoint integrity: checksums.json, written with every checkpoint and checked before any load.

    checksums.json   {"format": 1, "files": {"model.safetensors": {"bytes": N, "sha256": HEX}, ...}}

``write_manifest(folder)`` hashes every file of a complete checkpoint folder (and flushes it to
disk) just before the folder is renamed into place; ``verify_checkpoint(folder)`` compares sizes
and SHA-256 digests, so a truncated, bit-flipped or missing file is one ``CheckpointDamaged``
error (a ValueError: the CLI prints it as one line, exit 2) that names the file, instead of a
traceback from deep inside safetensors or torch.load, or weights silently read wrong. Checkpoints
written before checksums.json existed are checked as far as their formats allow and then accepted
as unverified. Each version of a folder is hashed once per process.
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST = "checksums.json"
_CHUNK = 1 << 23


class CheckpointDamaged(ValueError):
    """A checkpoint whose files are truncated, altered, missing or unreadable.

    ``folder`` is the checkpoint, ``reason`` what is wrong with which file; the message is one line.
    """

    def __init__(self, folder: str, reason: str, hint: str = ""):
        super().__init__(f"checkpoint {folder} is damaged: {reason}{hint}")
        self.folder, self.reason = folder, reason


def _files(folder: str) -> list[str]:
    """Paths (relative, "/"-separated, sorted) of every file of a checkpoint folder but checksums.json."""
    out = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _sha256(path: str, sync: bool = False) -> str:
    """SHA-256 of a file; ``sync`` also flushes it to disk (the pass that writes checksums.json)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
        if sync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def write_manifest(folder: str) -> None:
    """checksums.json of ``folder``: {"files": {path: {"bytes", "sha256"}}}; the files are fsynced."""
    files = {}
    for rel in _files(folder):
        path = os.path.join(folder, rel)
        files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path, sync=True)}
    with open(os.path.join(folder, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump({"format": 1, "files": files}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


_VERIFIED: dict[tuple, bool] = {}  # (folder, sizes and mtimes of its files) -> verified: hash each version once


def verify_checkpoint(folder: str) -> bool:
    """Check a checkpoint folder before it is read. True: every file matches checksums.json; False:
    a checkpoint without checksums.json (older code) whose files pass the format checks. Raises
    CheckpointDamaged naming the first bad file."""
    stats = []
    for name in [*_files(folder), MANIFEST]:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            st = os.stat(path)
            stats.append((name, st.st_size, st.st_mtime_ns))
    key = (os.path.abspath(folder), tuple(stats))
    if key not in _VERIFIED:
        manifest = os.path.join(folder, MANIFEST)
        _VERIFIED[key] = _check_manifest(folder, manifest) if os.path.isfile(manifest) else _check_formats(folder)
    return _VERIFIED[key]


def _check_manifest(folder: str, manifest: str) -> bool:
    try:
        with open(manifest, encoding="utf-8") as fh:
            files = json.load(fh)["files"]
        expected = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointDamaged(folder, f"{MANIFEST} is unreadable ({type(e).__name__})") from None
    for rel, (size, digest) in sorted(expected.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise CheckpointDamaged(folder, f"{rel} is missing")
        actual = os.path.getsize(path)
        if actual < size:
            raise CheckpointDamaged(folder, f"{rel} is truncated ({actual:,} of {size:,} bytes)")
        if actual != size:
            raise CheckpointDamaged(folder, f"{rel} has {actual:,} bytes, {size:,} were written")
        if _sha256(path) != digest:
            raise CheckpointDamaged(folder, f"{rel} differs from what was written (SHA-256 mismatch: corrupted bytes)")
    return True


def _check_formats(folder: str) -> bool:
    """What can be checked without checksums.json: the safetensors header against the file size,
    the CRC-32 of every member of trainer.pt (a zip), config.json as JSON."""
    import zipfile

    weights = os.path.join(folder, "model.safetensors")
    if os.path.isfile(weights):
        size = os.path.getsize(weights)
        with open(weights, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            head = fh.read(n) if 8 + n <= size else None
        if head is None:
            raise CheckpointDamaged(folder, f"model.safetensors is truncated ({size:,} bytes, inside its header)")
        try:
            header = json.loads(head)
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            raise CheckpointDamaged(folder, "model.safetensors has no readable safetensors header") from None
        if 8 + n + end > size:
            raise CheckpointDamaged(folder, f"model.safetensors is truncated ({size:,} of {8 + n + end:,} bytes)")
    try:
        with zipfile.ZipFile(os.path.join(folder, "trainer.pt")) as z:
            bad = z.testzip()
    except Exception:  # any failure to read the zip (BadZipFile, EOFError, zlib.error, ...): the file is damaged
        raise CheckpointDamaged(folder, "trainer.pt is truncated or not a torch.save file") from None
    if bad is not None:
        raise CheckpointDamaged(folder, f"trainer.pt is corrupted (its member {bad} fails its CRC check)")
    read_json(folder, "config.json")
    return False


def read_json(folder: str, name: str):
    """A JSON file of a checkpoint folder; missing or invalid is CheckpointDamaged."""
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise CheckpointDamaged(folder, f"{name} is missing") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(folder, f"{name} is not valid JSON ({e})") from None
