"""Registry of FFW kinds: the one table that maps a kind name to its config dataclass and builder.

    register_ffw("peer", PEERConfig, PEER.from_config)   # at the bottom of layers/peer.py
    get_ffw("peer")        -> FFWKind(name="peer", config_cls=PEERConfig, build=PEER.from_config)
    ffw_kinds()            -> ["dense", "peer", "pkm", "moe"]   (registration order)
    build(512, PEERConfig(top_k=8))  -> a PEER module of width 512

The LM config (``torchpeer.lm.config.ModelConfig``) has one section per registered kind and the LM
model builds its blocks' FFWs through ``build``; nothing else lists the kinds. Every built module
maps (..., d_model) -> (..., d_model) and has ``cost() -> FFWCost``; it may define
``aux_loss() -> Tensor | None`` (an already weighted term the trainer adds to the loss) and
``optim_groups() -> {"expert": [...], "no_decay": [...]}`` (parameters the LM optimizer treats
specially; everything else is grouped by shape) and ``lr_scales() -> [(multiplier, [params])]``
(parameters whose lr is ``multiplier`` x the group's). A layer that runs ``torchpeer.ops`` has
``op_backends() -> {op: backend}``, what the ops dispatcher resolved for it (``backend_report``).

Shared state: a kind may register ``build_shared(d_model, cfg) -> nn.Module | None``, a module
that the LM builds once and hands to every layer of that kind (``build(d_model, cfg, shared)``);
the LM owns it (``TransformerLM.ffw_shared``), so it is counted, saved and optimised once. PEER
uses it for ``shared_pool`` (one expert pool read by all its layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FFWKind:
    """One registered FFW kind: ``build(d_model, cfg)`` makes the module from a ``config_cls``;
    ``build_shared`` (optional) makes the module its layers share (see the module docstring)."""

    name: str
    config_cls: type
    build: Callable[..., nn.Module]
    build_shared: Callable[[int, object], nn.Module | None] | None = None


_KINDS: dict[str, FFWKind] = {}


def register_ffw(
    name: str,
    config_cls: type,
    build: Callable[..., nn.Module],
    build_shared: Callable[[int, object], nn.Module | None] | None = None,
) -> FFWKind:
    """Register FFW kind ``name``; ``config_cls`` must be a dataclass whose every field has a default
    (the LM config makes a default section per kind). Re-registering a name is an error.
    ``build_shared``: see the module docstring; ``build`` must then accept a third argument."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"FFW kind name must be an identifier (it is a config section), got {name!r}")
    if name in _KINDS:
        raise ValueError(f"FFW kind {name!r} is already registered (by {_KINDS[name].config_cls.__qualname__})")
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise TypeError(f"config_cls of FFW kind {name!r} must be a dataclass type, got {config_cls!r}")
    try:
        config_cls()
    except TypeError as e:
        raise TypeError(f"every field of {config_cls.__qualname__} needs a default: {e}") from None
    if not callable(build):
        raise TypeError(f"build of FFW kind {name!r} must be callable (d_model, cfg) -> nn.Module")
    if build_shared is not None and not callable(build_shared):
        raise TypeError(f"build_shared of FFW kind {name!r} must be callable (d_model, cfg) -> nn.Module or None")
    kind = FFWKind(name, config_cls, build, build_shared)
    _KINDS[name] = kind
    return kind


def ffw_kinds() -> list[str]:
    """Names of the registered FFW kinds, in registration order."""
    return list(_KINDS)


def get_ffw(name: str) -> FFWKind:
    """The registered kind ``name``; an unknown name is a ValueError listing the known ones."""
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown FFW kind {name!r}; registered kinds: {', '.join(_KINDS)}") from None


def kind_of_config(cfg) -> FFWKind:
    """The registered kind whose config dataclass ``cfg`` is an instance of."""
    for kind in _KINDS.values():
        if type(cfg) is kind.config_cls:
            return kind
    raise TypeError(
        f"{type(cfg).__qualname__} is not the config of a registered FFW kind; "
        f"registered: {', '.join(f'{k.name} ({k.config_cls.__qualname__})' for k in _KINDS.values())}"
    )


def build(d_model: int, cfg, shared: nn.Module | None = None) -> nn.Module:
    """The FFW module described by config dataclass ``cfg`` (its kind is found from its type);
    ``shared``: the module its kind's ``build_shared`` made for this model, if any."""
    kind = kind_of_config(cfg)
    return kind.build(d_model, cfg) if shared is None else kind.build(d_model, cfg, shared)


def build_shared(d_model: int, cfg) -> nn.Module | None:
    """The module shared by all layers of ``cfg``'s kind in one model (None if the kind or ``cfg``
    asks for none)."""
    kind = kind_of_config(cfg)
    return kind.build_shared(d_model, cfg) if kind.build_shared is not None else None


def backend_report(model: nn.Module) -> dict[str, dict[str, str]]:
    """{module name: {op: backend}} for every layer of ``model`` that runs torchpeer ops, as resolved
    by the ops dispatcher on the device of the layer's parameters (e.g.
    ``{"blocks.2.ffw": {"product_key_topk": "triton", "expert_mix": "triton"}}``)."""
    return {
        name or ".": mod.op_backends()
        for name, mod in model.named_modules()
        if callable(getattr(mod, "op_backends", None))
    }


def sum_aux_losses(model: nn.Module) -> torch.Tensor | None:
    """Sum of the (already weighted) ``aux_loss()`` terms of the submodules of ``model`` that define
    one (``model`` itself excluded), e.g. token-choice MoE balance terms; None if there are none."""
    total = None
    for mod in model.modules():
        fn = getattr(mod, "aux_loss", None)
        if mod is model or not callable(fn):
            continue
        term = fn()
        if term is not None:
            total = term if total is None else total + term
    return total
