"""Back into torchpeer: an exported model folder (``torchpeer export-hf``) as a TransformerLM.

Needs no transformers: config.json's "torchpeer" section is the run config, the safetensors
weights are the TransformerLM's under the prefix "model.", and torchpeer_tokenizer/ is the
torchpeer tokenizer. torchpeer eval and generate use ``load_exported``; ``torchpeer train DIR``
continues training it in a new run (``continue_from_exported``).
"""

from __future__ import annotations

import copy
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


def continue_from_exported(path: str, overrides=()):
    """(RunConfig, init_from) for a NEW run that continues training an exported folder's model.

        cfg, init_from = continue_from_exported(DIR, ["--train.max_steps", "1000"])
        train(cfg, "runs/more", init_from=init_from)     # CLI: torchpeer train DIR --run-dir runs/more

    The config is the exported run config with ``overrides`` applied (train/data settings; a
    change of the model is a ValueError). The run tokenizes with the exported tokenizer (a BPE one
    is read from DIR/torchpeer_tokenizer, not retrained), and ``init_from(model)`` loads the
    exported weights strictly into the freshly built model (on every rank; not on resume).
    """
    from torchpeer.data.tokenizer import ByteTokenizer
    from torchpeer.lm.config_io import apply_overrides

    model, tok, cfg = load_exported(path)
    exported_model = copy.deepcopy(cfg.model)
    apply_overrides(cfg, list(overrides))
    if cfg.model != exported_model:
        raise ValueError(
            f"cannot continue {path!r} with a different model: drop the --model.* overrides "
            "(train and data settings may change)"
        )
    if tok is not None and not isinstance(tok, ByteTokenizer):
        # A tokenizer.json folder is a "gpt2:DIR" tokenizer spec: the same token ids, nothing retrained.
        cfg.data.tokenizer = "gpt2:" + os.path.abspath(os.path.join(path, TORCHPEER_TOKENIZER_DIR))
    state = model.state_dict()

    def init_from(new_model: torch.nn.Module) -> None:
        new_model.load_state_dict(state, strict=True)

    return cfg, init_from
