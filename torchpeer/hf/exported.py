"""Back into torchpeer: an exported model folder (``torchpeer export-hf``) as a TransformerLM.

Needs no transformers: config.json's "torchpeer" section is the run config, the safetensors
weights are the TransformerLM's under the prefix "model.", and torchpeer_tokenizer/ is the
torchpeer tokenizer. torchpeer eval, generate and continued training use ``load_exported``.
"""

from __future__ import annotations

import json
import os

import torch

from torchpeer.hf.tokenizer_files import TORCHPEER_TOKENIZER_DIR
from torchpeer.hf.weights import load_safetensors_into, weight_files

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
