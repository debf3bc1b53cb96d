"""Checkpoints: one folder per step under ``RUN_DIR/checkpoints/``, written atomically, checked on load.

    step_00001000/
      model.safetensors    weights and buffers (BatchNorm running stats), tied tensors stored once
      trainer.pt           step, tokens, optimizer, lr schedule, data sampler position, RNG states
      config.json          the full run config (model.vocab_size resolved)
      tokenizer/           the tokenizer (so that eval/generate need not rebuild it)
      checksums.json       size and SHA-256 of every other file, written last (integrity.py)

Writing: the folder is assembled under a temporary name, every file is flushed to disk while
checksums.json is computed, and the folder is renamed into place (``os.replace``), so a crash
leaves either a complete checkpoint or none; after the rename only the ``keep`` newest are kept.
``latest_checkpoint`` ignores leftover temporaries (rundir.remove_stale_partials deletes them
when a run starts).

Reading: every loader first checks the folder against checksums.json (integrity.py): a
truncated, altered or missing file is a ``CheckpointDamaged`` error naming the file. Given a run
folder, ``resolve_checkpoint`` takes the newest intact checkpoint and says which newer ones it
skipped (a checkpoint folder given directly must be intact; the error names an intact older one).

A distributed run keeps its weights in ``dcp/`` instead of ``model.safetensors``; torchpeer.parallel
reads those (the core never imports it): callers hand its reader in (``load_model_from_checkpoint
(..., read_dcp_weights=...)``, the parallel plan's ``load_checkpoint``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from torchpeer.data.atomic import plain_file_mode
from torchpeer.jsonl import run_metrics_path
from torchpeer.lm.config import RunConfig
from torchpeer.lm.integrity import MANIFEST, CheckpointDamaged, read_json, verify_checkpoint, write_manifest

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_step(path: str) -> int | None:
    """The step of checkpoint folder ``path`` from its name step_<step> (None for another name)."""
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint folders of a run, oldest first (not yet verified: one that has lost its
    trainer.pt is listed, and its check names the missing file)."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        step = checkpoint_step(name)
        if step is not None and _is_checkpoint_folder(os.path.join(root, name)):
            found.append((step, os.path.join(root, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str) -> str | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def latest_checkpoint_step(run_dir: str) -> int | None:
    """The step of ``run_dir``'s newest complete checkpoint (None without one), from its folder name;
    what a sweep reads to say how far an interrupted run got and what is left of it."""
    path = latest_checkpoint(run_dir)
    return checkpoint_step(path) if path else None


def newest_intact_checkpoint(run_dir: str, candidates: list[str] | None = None):
    """(the newest checkpoint of ``run_dir`` (or of ``candidates``, oldest first) that verifies, or
    None; the newer damaged ones as CheckpointDamaged errors)."""
    damaged = []
    for path in reversed(list_checkpoints(run_dir) if candidates is None else candidates):
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as e:
            damaged.append(e)
            continue
        return path, damaged
    return None, damaged


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resolve_checkpoint(path: str, say=_stderr) -> str:
    """A verified checkpoint folder: ``path`` itself, or the newest intact checkpoint of run folder
    ``path`` (``say(line)`` is told of each newer damaged one it skipped). Raises CheckpointDamaged
    (a ValueError) naming an intact older one when the folder given is damaged, ValueError when a run
    folder has no intact checkpoint, FileNotFoundError when there is none at all (naming the runs
    inside when ``path`` is a folder of runs, such as a sweep's)."""
    if _is_checkpoint_folder(path):
        try:
            verify_checkpoint(path)
        except CheckpointDamaged as e:
            run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
            name = os.path.basename(os.path.abspath(path))
            older = [p for p in list_checkpoints(run_dir) if os.path.basename(p) < name]  # zero-padded steps
            intact = next((p for p in reversed(older) if _intact(p)), None)
            if intact and not os.path.isabs(path):
                intact = os.path.relpath(intact)  # as the damaged one was named, not /abs/path/...
            hint = f"; the older checkpoint {intact} beside it is intact, use that" if intact else ""
            raise CheckpointDamaged(e.folder, e.reason, hint) from None
        return path
    if os.path.isdir(path) and list_checkpoints(path):
        found, damaged = newest_intact_checkpoint(path)
        if found is None:
            why = "; ".join(f"{os.path.basename(e.folder)}: {e.reason}" for e in damaged)
            raise ValueError(f"no intact checkpoint in {path}: {why}")
        for e in damaged:
            say(f"{e}; using {os.path.basename(found)}, the newest intact one")
        return found
    run_dir = os.path.dirname(os.path.normpath(path)) or "."
    if os.path.basename(os.path.normpath(path)) == "checkpoints" and (ckpts := list_checkpoints(run_dir)):
        raise FileNotFoundError(
            f"{path!r} is the checkpoints folder of the run folder {run_dir!r}, not one checkpoint: give the run "
            f"folder (its newest intact checkpoint is used) or one checkpoint, e.g. the newest, {ckpts[-1]!r}"
        )
    if os.path.isdir(path):
        runs = runs_below(path)
        if runs:
            shown = ", ".join(runs[:8]) + (f" (and {len(runs) - 8} more)" if len(runs) > 8 else "")
            raise FileNotFoundError(f"{path!r} is a folder of {len(runs)} runs, not one run: give one of {shown}")
        if os.path.exists(os.path.join(path, "results.jsonl")):  # a sweep whose runs kept no checkpoints
            raise FileNotFoundError(
                f"{path!r} is a sweep's runs folder whose runs kept no checkpoints (train.checkpoint false): "
                f"their final evaluations are in its results.jsonl; see them with 'torchpeer report {path}'"
            )
        if run_metrics_path(path) is not None:  # torchpeer train wrote it (or a committed copy), but no checkpoint
            finished = os.path.isfile(os.path.join(path, "summary.json"))
            summary = "; its final evaluation is in its summary.json" if finished else ""
            raise FileNotFoundError(
                f"{path!r} is a run folder without checkpoints (trained with train.checkpoint = false, or stopped "
                f"before its first checkpoint){summary}"
            )
        raise FileNotFoundError(f"{path!r} is neither a checkpoint folder nor a run folder with checkpoints")
    if os.path.exists(path):  # a file: e.g. model.safetensors or config.json of a checkpoint
        raise FileNotFoundError(
            f"checkpoint {path!r} is a file; give its folder (RUN_DIR/checkpoints/step_<N>) or the run folder"
        )
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")


def _is_checkpoint_folder(path: str) -> bool:
    """trainer.pt marks a checkpoint folder; one that has lost it (deleted to save space, say) still has
    checksums.json, and is then a checkpoint whose check names the missing file, not "no checkpoint"."""
    return os.path.isfile(os.path.join(path, "trainer.pt")) or os.path.isfile(os.path.join(path, MANIFEST))


def _intact(path: str) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointDamaged:
        return False


def runs_below(folder: str, depth: int = 2) -> list[str]:
    """Run folders (with checkpoints) under ``folder``, up to ``depth`` levels down (a sweep's runs/)."""
    out = []
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub) or name.startswith("."):
            continue
        if list_checkpoints(sub):
            out.append(sub)
        elif depth > 1:
            out += runs_below(sub, depth - 1)
    return out


# ----------------------------------------------------------------------------- writing


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict,
    cfg: RunConfig,
    tokenizer=None,
    keep: int = 2,
) -> str:
    """Write ``step_<step>`` atomically, then delete all but the ``keep`` newest; returns its path.
    On a disk too full for it, the checkpoints it would delete afterwards go first (make_room)."""
    make_room(run_dir, keep)
    tmp, final = new_partial_dir(run_dir, step)
    try:
        save_model(model, os.path.join(tmp, "model.safetensors"))
        plain_file_mode(os.path.join(tmp, "model.safetensors"))  # safetensors writes it 0600
        write_checkpoint_meta(tmp, trainer_state, step, cfg, tokenizer)
        return publish_checkpoint(tmp, final, run_dir, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def written_checkpoints(run_dir: str) -> list[str]:
    """The checkpoints as the trainer wrote them (with trainer.pt), oldest first: the ones pruning may
    delete; a folder without trainer.pt (stripped by hand, kept for its weights) is never pruned."""
    return [p for p in list_checkpoints(run_dir) if os.path.isfile(os.path.join(p, "trainer.pt"))]


def folder_bytes(path: str) -> int:
    """Bytes of the files under ``path``, subfolders included."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def make_room(run_dir: str, keep: int) -> list[str]:
    """Before a checkpoint is written: when the disk has less free space than the newest complete
    checkpoint takes (the size the next one will have), delete now the ones publish_checkpoint would
    delete after the save anyway (all but the keep - 1 newest), so that the save does not fail on a
    full disk (as it did on a shared GPU machine with several 1.1B-parameter runs). Says what it
    deleted; returns their paths. With room enough nothing changes: the old ones go only after the
    new one is complete."""
    written = written_checkpoints(run_dir)
    doomed = written[: max(0, len(written) - max(0, keep - 1))]
    if not doomed:
        return []
    need = folder_bytes(written[-1])  # with the shards of a sharded (DCP) checkpoint's dcp/ folder
    free = shutil.disk_usage(checkpoint_dir(run_dir)).free
    if free >= need:
        return []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    names = ", ".join(os.path.basename(p) for p in doomed)
    print(f"disk nearly full ({free / 2**30:.1f} GiB free, a checkpoint takes {need / 2**30:.1f} GiB): deleted "
          f"{names} before writing the next checkpoint instead of after it (train.keep_checkpoints = {keep})",
          flush=True)  # fmt: skip
    return doomed


def new_partial_dir(run_dir: str, step: int) -> tuple[str, str]:
    """(temporary folder to assemble checkpoint ``step`` in, its final path) under RUN_DIR/checkpoints."""
    root = checkpoint_dir(run_dir)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".step_{step:08d}.", suffix=".tmp")
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    return tmp, os.path.join(root, f"step_{step:08d}")


def write_checkpoint_meta(folder: str, trainer_state: dict, step: int, cfg: RunConfig, tokenizer=None) -> None:
    """Everything of a checkpoint but the weights: trainer.pt (state + step + RNG), config.json, tokenizer/."""
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, os.path.join(folder, "trainer.pt"))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(cfg.to_dict(), fh, indent=2)
    if tokenizer is not None:
        tokenizer.save(os.path.join(folder, "tokenizer"))


def publish_checkpoint(tmp: str, final: str, run_dir: str, keep: int) -> str:
    """Write checksums.json of the complete folder ``tmp``, rename it to ``final`` (swapping out an
    older copy of the same step), then delete all but the ``keep`` newest checkpoints; returns ``final``."""
    write_manifest(tmp)
    if os.path.isdir(final):  # re-saving the same step (e.g. the final one): swap it out
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))  # the rename itself reaches the disk
    written = written_checkpoints(run_dir)  # the keep newest of them stay
    for stale in written[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- reading


def check_same_model(saved: RunConfig, cfg: RunConfig, ckpt: str) -> None:
    """Raise ValueError naming the model fields in which ``cfg`` differs from the checkpoint's."""
    da, db = _flat(dataclasses.asdict(saved.model), "model"), _flat(dataclasses.asdict(cfg.model), "model")
    if cfg.model.vocab_size is None:
        db["model.vocab_size"] = da["model.vocab_size"]
    changed = [(k, da.get(k), db.get(k)) for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)]
    if saved.data.tokenizer != cfg.data.tokenizer:
        changed.append(("data.tokenizer", saved.data.tokenizer, cfg.data.tokenizer))
    if changed:
        diffs = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in changed)
        flags = " ".join(f"--{k} {_as_flag(b)}" for k, _, b in changed)
        run_dir = os.path.dirname(os.path.dirname(os.path.normpath(ckpt))) or "."
        raise ValueError(
            f"cannot resume from {ckpt}: the model config differs from the checkpoint's ({diffs}); resume with "
            f"the checkpoint's settings, or start a new run with its config so changed: torchpeer train {run_dir} "
            f"--run-dir NEW_FOLDER {flags}"
        )


def _as_flag(value) -> str:
    """A config value as command-line override text (strings as they are, the rest as JSON)."""
    import shlex

    return shlex.quote(value) if isinstance(value, str) else shlex.quote(json.dumps(value))


def _flat(d: dict, prefix: str) -> dict:
    """{"a": {"b": 1}} -> {"prefix.a.b": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def read_checkpoint_config(path: str) -> RunConfig:
    verify_checkpoint(path)
    return RunConfig.from_dict(read_json(path, "config.json"))


def is_dcp_checkpoint(path: str) -> bool:
    """A checkpoint written by a distributed plan: weights in ``dcp/`` (torch.distributed.checkpoint)."""
    return os.path.isdir(os.path.join(path, "dcp"))


def _unreadable(path: str, name: str, e: Exception) -> CheckpointDamaged:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CheckpointDamaged(path, f"{name} cannot be read ({first})")


def load_weights(model: torch.nn.Module, path: str, device: str | torch.device = "cpu") -> None:
    """Load ``model.safetensors`` of checkpoint folder ``path`` into ``model`` (strict), after
    verify_checkpoint. A distributed run's ``dcp/`` weights are torchpeer.parallel's to read."""
    verify_checkpoint(path)
    if is_dcp_checkpoint(path):
        raise ValueError(
            f"{path} holds a distributed run's weights (dcp/), which torchpeer.parallel reads: use torchpeer "
            "eval/generate, or load_model_from_checkpoint(path, read_dcp_weights=torchpeer.parallel.checkpoint."
            "load_dcp_weights)"
        )
    try:
        load_model(model, os.path.join(path, "model.safetensors"), strict=True, device=str(device))
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # a missing/unexpected tensor: another model, said as is
            raise
        raise _unreadable(path, "model.safetensors", e) from None


def load_trainer_state(path: str) -> dict:
    """trainer.pt of checkpoint folder ``path`` (after verify_checkpoint)."""
    import pickle
    import zipfile

    verify_checkpoint(path)
    try:
        # Our own file: it holds numpy/python RNG states, so weights_only=False is required.
        return torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise _unreadable(path, "trainer.pt", e) from None


def load_checkpoint_tokenizer(path: str):
    """The tokenizer saved with a checkpoint, or None if it has none."""
    from torchpeer.data.tokenizer import load_saved_tokenizer

    tok_dir = os.path.join(path, "tokenizer")
    return load_saved_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None


def load_model_from_checkpoint(path: str, device: str | torch.device = "cpu", read_dcp_weights=None, say=_stderr):
    """(model in eval mode, RunConfig, checkpoint folder) from a checkpoint or run folder (its newest
    intact checkpoint). read_dcp_weights: ``fn(model, folder)`` for a distributed run's checkpoint
    (torchpeer.parallel.checkpoint.load_dcp_weights)."""
    from torchpeer.lm.model import TransformerLM

    path = resolve_checkpoint(path, say)
    cfg = read_checkpoint_config(path)
    model = TransformerLM(cfg.model)
    if is_dcp_checkpoint(path) and read_dcp_weights is not None:
        read_dcp_weights(model, path)
    else:
        load_weights(model, path)
    return model.to(device).eval(), cfg, path
