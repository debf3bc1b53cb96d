"""PEER inside transformers causal LMs: swap the MLP of chosen decoder blocks for a PEER layer.

    model = AutoModelForCausalLM.from_config(LlamaConfig(...))
    peerify(model, blocks=[1], n_experts=64**2, heads=4, top_k=8, d_key=32)
    model.save_pretrained("out")                      # config.json records config.peer
    model = torchpeer.hf.from_pretrained("out")       # base class from config, peerify, load weights
    # not AutoModelForCausalLM.from_pretrained("out"): it builds the plain model, with a new random MLP
    # in each peerified block (its load report lists those weights as UNEXPECTED / MISSING)

The decoder blocks are found from the model's structure (not its class name), so any model laid
out like GPT-2 (``transformer.h[i].mlp``) or like Llama / Qwen2 / Mistral (``model.layers[i].mlp``)
works. In these families the block calls ``self.mlp(hidden_states)`` with one tensor
(batch, seq, hidden) and adds the returned tensor to the residual stream, which is exactly the
PEER call convention, so the PEER module itself becomes ``block.mlp``.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from torchpeer.hf._compat import require_transformers
from torchpeer.hf.weights import load_safetensors_into, weight_files

# (family, attribute path from the causal-LM wrapper to its list of decoder blocks). A bare base
# model (GPT2Model, LlamaModel) is matched by the path without its first element.
FAMILIES = (
    ("GPT-2", ("transformer", "h")),
    ("Llama/Qwen2", ("model", "layers")),
)
# The PEER settings that are recorded in config.peer (the public PEER constructor arguments).
PEER_SETTINGS = ("n_experts", "heads", "top_k", "d_key", "activation", "gate", "query_norm", "shared_keys", "backend")


def supported_families() -> str:
    return "; ".join(f"{name} ({'.'.join(path)}[i].mlp)" for name, path in FAMILIES)


def decoder_blocks(model: nn.Module) -> tuple[str, str, nn.ModuleList]:
    """(family name, dotted path, the ModuleList of decoder blocks) of a transformers model."""
    for name, path in FAMILIES:
        for p in (path, path[1:]):
            obj = model
            for attr in p:
                obj = getattr(obj, attr, None)
            if (
                isinstance(obj, nn.ModuleList)
                and len(obj)
                and all(isinstance(getattr(b, "mlp", None), nn.Module) for b in obj)
            ):
                return name, ".".join(p), obj
    raise ValueError(
        f"peerify does not recognise {type(model).__name__}: supported are decoder-only models laid out like "
        f"{supported_families()}"
    )


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    d = getattr(cfg, "hidden_size", None) if cfg is not None else None
    if not isinstance(d, int):
        raise ValueError(f"{type(model).__name__} has no config.hidden_size: cannot size the PEER layer")
    return d


def _peer_settings(peer_kwargs: dict) -> dict:
    """All PEER settings: the given ones over the PEER constructor defaults (recorded so a later
    change of a default cannot change a saved model)."""
    from torchpeer import PEER

    unknown = sorted(set(peer_kwargs) - set(PEER_SETTINGS))
    if unknown:
        raise TypeError(f"unknown PEER setting(s) {unknown}; valid: {', '.join(PEER_SETTINGS)}")
    params = inspect.signature(PEER.__init__).parameters
    empty = inspect.Parameter.empty
    settings = {k: params[k].default for k in PEER_SETTINGS if k in params and params[k].default is not empty}
    settings.update(peer_kwargs)
    return settings


def _check_blocks(blocks, n: int, family: str) -> list[int]:
    """``blocks`` as sorted 0-based indices: an index, a list of them, or the LM configs' placements
    "middle" (block n // 2, the paper's) and "all"."""
    if blocks == "middle":
        blocks = [n // 2]
    elif blocks == "all":
        blocks = list(range(n))
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        blocks = [blocks]
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise TypeError(f'blocks must be a non-empty list of block indices, "middle" or "all", got {blocks!r}')
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"block indices must be ints, got {b!r}")
        if not 0 <= b < n:
            raise ValueError(
                f"block index {b} is out of range: this {family} model has {n} decoder blocks (0..{n - 1})"
            )
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"blocks {list(blocks)} lists a block twice")
    return sorted(blocks)


def peerify(model: nn.Module, blocks, **peer_kwargs) -> nn.Module:
    """Replace ``block.mlp`` of decoder blocks ``blocks`` (0-based indices, or "middle": block
    n_blocks // 2 as in the paper, or "all") by ``torchpeer.PEER``, in place.

    peer_kwargs: PEER settings (n_experts, heads, top_k, d_key, activation, gate, query_norm,
    shared_keys, backend). The PEER layer takes the device and dtype of the MLP it replaces, and
    the settings are recorded as ``model.config.peer = {"blocks": [...], **settings}`` so that
    ``save_pretrained`` stores them and ``torchpeer.hf.from_pretrained`` rebuilds the model.
    Returns ``model``.
    """
    from torchpeer import PEER

    family, _, layers = decoder_blocks(model)
    blocks = _check_blocks(blocks, len(layers), family)
    cfg = getattr(model, "config", None)
    if getattr(cfg, "peer", None):
        raise ValueError(f"this model is already peerified (config.peer = {cfg.peer}); peerify a fresh model")
    settings = _peer_settings(peer_kwargs)
    d_model = _hidden_size(model)
    for b in blocks:
        old = layers[b].mlp
        ref = next(iter(old.parameters()), None)
        peer = PEER(d_model, **settings)
        if ref is not None:
            peer = peer.to(device=ref.device, dtype=ref.dtype)
        layers[b].mlp = peer
    if cfg is not None:
        cfg.peer = {"blocks": blocks, **settings}
    return model


def from_pretrained(directory: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
    """Load a folder written by ``save_pretrained`` of a peerified model (offline, local folder).

    The base class comes from config.json (``AutoModelForCausalLM.from_config``), PEER layers are
    put back from ``config.peer``, then the safetensors weights are loaded strictly. Returns the
    model in eval mode. A folder without ``config.peer`` loads as the plain model.
    """
    transformers = require_transformers()
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory!r} has no config.json: not a saved transformers model")
    from torchpeer.hf.exported import is_exported_folder

    if is_exported_folder(directory):  # else transformers asks on stdin whether to run its code, then raises
        raise ValueError(
            f"{directory!r} is a torchpeer export-hf folder, not a peerified transformers model: load it with "
            f"torchpeer.hf.load_exported({directory!r}) or "
            f"AutoModelForCausalLM.from_pretrained({directory!r}, trust_remote_code=True)"
        )
    config = transformers.AutoConfig.from_pretrained(directory)
    peer = getattr(config, "peer", None)
    if peer is not None:
        del config.peer
    model = transformers.AutoModelForCausalLM.from_config(config)
    if peer:
        peer = dict(peer)
        peerify(model, peer.pop("blocks"), **peer)
    load_safetensors_into(model, weight_files(directory))
    if os.path.isfile(os.path.join(directory, "generation_config.json")):
        model.generation_config = transformers.GenerationConfig.from_pretrained(directory)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()
