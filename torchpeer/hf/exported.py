"""Back into torchpeer: an exported model folder (``torchpeer export-hf``) as a TransformerLM.

Needs no transformers: config.json's "torchpeer" section is the run config, the safetensors
weights are the TransformerLM's under the prefix "model.", and torchpeer_tokenizer/ is the
torchpeer tokenizer. torchpeer eval and generate use ``load_exported``; continued training starts
a new run from the exported weights with the ``InitFromExported`` callback.
"""

from __future__ import annotations

import json
import os

import torch

from torchpeer.hf.tokenizer_files import TORCHPEER_TOKENIZER_DIR
from torchpeer.hf.weights import load_safetensors_into, weight_files
from torchpeer.lm.callbacks import Callback

WEIGHT_PREFIX = "model."


def _read_config(path: str) -> dict | None:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return None
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def is_exported_folder(path: str) -> bool:
    """True if ``path`` is a folder whose config.json has a "torchpeer" section (an export-hf folder)."""
    d = _read_config(path) if os.path.isdir(path) else None
    return d is not None and isinstance(d.get("torchpeer"), dict)


def load_exported(path: str, device: str | torch.device = "cpu"):
    """(TransformerLM in eval mode, torchpeer tokenizer or None, RunConfig) of an exported folder."""
    from torchpeer.data.tokenizer import load_saved_tokenizer
    from torchpeer.lm.config import RunConfig
    from torchpeer.lm.model import TransformerLM

    if not os.path.isdir(path):
        raise FileNotFoundError(f"exported model folder {path!r} does not exist")
    d = _read_config(path)
    if d is None or not isinstance(d.get("torchpeer"), dict):
        raise ValueError(f"{path!r} is not an exported torchpeer model: its config.json has no 'torchpeer' section")
    cfg = RunConfig.from_dict(d["torchpeer"])
    model = TransformerLM(cfg.model)
    load_safetensors_into(model, weight_files(path), prefix=WEIGHT_PREFIX)
    tok_dir = os.path.join(path, TORCHPEER_TOKENIZER_DIR)
    tok = load_saved_tokenizer(tok_dir) if os.path.isdir(tok_dir) else None
    return model.to(device).eval(), tok, cfg


class InitFromExported(Callback):
    """Trainer callback: start a NEW run from the weights of an exported folder (continued training).

        model, tok, cfg = load_exported(DIR)          # cfg: the exported run config; edit cfg.train
        train(cfg, "runs/more", callbacks=[InitFromExported(DIR)])

    On ``on_train_start`` of a fresh run (step 0) the exported weights are loaded strictly into
    ``trainer.model``; a resumed run (step > 0) keeps its checkpoint. The run's model config and
    tokenizer must be the exported ones (one ValueError otherwise). Single process: callbacks run
    on rank 0 only, so this does not initialise the other ranks of a distributed run.
    """

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer) -> None:
        if trainer.step > 0:
            return
        model, tok, cfg = load_exported(self.path)
        if cfg.model != trainer.cfg.model:
            raise ValueError(f"cannot start from {self.path!r}: the run's model config differs from the exported one")
        if tok is not None and tok.fingerprint != trainer.tokenizer.fingerprint:
            raise ValueError(
                f"cannot start from {self.path!r}: the run's tokenizer ({trainer.tokenizer.name}) is not the "
                f"exported one ({tok.name}); use the exported config's data.tokenizer"
            )
        trainer.model.load_state_dict(model.state_dict(), strict=True)
