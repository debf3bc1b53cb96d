"""Checkpoints: one folder per step under ``RUN_DIR/checkpoints/``, written atomically.

    step_00001000/
      model.safetensors    weights and buffers (BatchNorm running stats), tied tensors stored once
      trainer.pt           step, tokens, optimizer, lr schedule, data sampler position, RNG states
      config.json          the full run config (model.vocab_size resolved)
      tokenizer/           the tokenizer (so that eval/generate need not rebuild it)

The folder is assembled under a temporary name and renamed into place (``os.replace``), so a
crash leaves either a complete checkpoint or none; after the rename only the ``keep`` newest
are kept. ``latest_checkpoint`` ignores leftover temporaries (rundir.remove_stale_partials deletes
them when a run starts). A distributed run keeps its weights in ``dcp/`` instead of
``model.safetensors`` (torchpeer.parallel); ``load_weights`` reads either.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import tempfile

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from torchpeer.lm.config import RunConfig

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint folders of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "trainer.pt")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str) -> str | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str) -> str:
    """A checkpoint folder, or a run folder (-> its latest checkpoint)."""
    if os.path.isfile(os.path.join(path, "trainer.pt")):
        return path
    if os.path.isdir(path):
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
        raise FileNotFoundError(f"{path!r} is neither a checkpoint folder nor a run folder with checkpoints")
    raise FileNotFoundError(f"checkpoint {path!r} does not exist")


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
    """Write ``step_<step>`` atomically, then delete all but the ``keep`` newest; returns its path."""
    tmp, final = new_partial_dir(run_dir, step)
    try:
        save_model(model, os.path.join(tmp, "model.safetensors"))
        write_checkpoint_meta(tmp, trainer_state, step, cfg, tokenizer)
        return publish_checkpoint(tmp, final, run_dir, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    """Rename the complete folder ``tmp`` to ``final`` (swapping out an older copy of the same step),
    then delete all but the ``keep`` newest checkpoints; returns ``final``."""
    if os.path.isdir(final):  # re-saving the same step (e.g. the final one): swap it out
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def check_same_model(saved: RunConfig, cfg: RunConfig, ckpt: str) -> None:
    """Raise ValueError naming the model fields in which ``cfg`` differs from the checkpoint's."""
    da, db = _flat(dataclasses.asdict(saved.model), "model"), _flat(dataclasses.asdict(cfg.model), "model")
    if cfg.model.vocab_size is None:
        db["model.vocab_size"] = da["model.vocab_size"]
    diffs = [
        f"{k}: checkpoint {da.get(k)!r}, now {db.get(k)!r}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)
    ]
    if saved.data.tokenizer != cfg.data.tokenizer:
        diffs.append(f"data.tokenizer: checkpoint {saved.data.tokenizer!r}, now {cfg.data.tokenizer!r}")
    if diffs:
        raise ValueError(
            f"cannot resume from {ckpt}: the model config differs from the checkpoint's ({'; '.join(diffs)}); "
            "resume with the checkpoint's settings, or start a new run with another --run-dir"
        )


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
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        return RunConfig.from_dict(json.load(fh))


def is_dcp_checkpoint(path: str) -> bool:
    """A checkpoint written by a distributed plan: weights in ``dcp/`` (torch.distributed.checkpoint)."""
    return os.path.isdir(os.path.join(path, "dcp"))


def load_weights(model: torch.nn.Module, path: str, device: str | torch.device = "cpu") -> None:
    """Load the weights of checkpoint folder ``path`` into ``model`` (strict): ``model.safetensors``,
    or the ``dcp/`` folder of a distributed run (through torchpeer.parallel)."""
    if is_dcp_checkpoint(path):
        from torchpeer.parallel.checkpoint import load_dcp_weights

        load_dcp_weights(model, path)
        return
    load_model(model, os.path.join(path, "model.safetensors"), strict=True, device=str(device))


def load_trainer_state(path: str) -> dict:
    # Our own file: it holds numpy/python RNG states, so weights_only=False is required.
    return torch.load(os.path.join(path, "trainer.pt"), map_location="cpu", weights_only=False)


def load_checkpoint_tokenizer(path: str):
    """The tokenizer saved with a checkpoint, or None if it has none."""
    from torchpeer.data.tokenizer import load_saved_tokenizer

    tok_dir = os.path.join(path, "tokenizer")
    return load_saved_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None


def load_model_from_checkpoint(path: str, device: str | torch.device = "cpu"):
    """(model in eval mode, RunConfig, checkpoint folder) from a checkpoint or run folder."""
    from torchpeer.lm.model import TransformerLM

    path = resolve_checkpoint(path)
    cfg = read_checkpoint_config(path)
    model = TransformerLM(cfg.model)
    load_weights(model, path)
    return model.to(device).eval(), cfg, path
