"""Safetensors weights of a model folder: find the files, load them strictly (tied tensors allowed)."""

from __future__ import annotations

import json
import os

from torch import nn


def weight_files(directory: str) -> list[str]:
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(directory, s) for s in shards]
    raise FileNotFoundError(f"{directory!r} has no model.safetensors (or model.safetensors.index.json)")


def load_safetensors_into(model: nn.Module, files: list[str], prefix: str = "") -> None:
    """Strictly load safetensors ``files`` into ``model`` (``prefix`` is stripped from stored names).

    A parameter absent from the files is accepted only if it is tied to (is the same tensor as) a
    stored one, e.g. ``lm_head.weight`` tied to the token embedding, which transformers saves once.
    """
    from safetensors.torch import load_file

    state = {}
    for f in files:
        for k, v in load_file(f).items():
            state[k[len(prefix) :] if prefix and k.startswith(prefix) else k] = v
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"the weights hold tensors this model does not have: {unexpected[:5]}")
    loaded = {id(t) for name, t in model.state_dict(keep_vars=True).items() if name in state}
    own = model.state_dict(keep_vars=True)
    untied = [k for k in missing if id(own[k]) not in loaded]
    if untied:
        raise ValueError(f"the weights lack tensors of this model: {untied[:5]}")
