"""Run configuration dataclasses and their validation.

A run config has three tables, each a dataclass::

    [model]            ModelConfig   (+ one section per registered FFW kind: [model.dense] [model.peer] ...)
    [train]            TrainConfig
    [data]             torchpeer.data.DataConfig  (+ [data.valid])

Reading and writing them (TOML files, ``--a.b value`` overrides, type coercion) is config_io.py;
this module only says what a config is and what makes one valid. The FFW sections come from the
layer registry (``torchpeer.layers.registry``): ``ModelConfig.peer`` is a ``PEERConfig`` because
the "peer" kind is registered with it, so a new kind gets its ``[model.<kind>]`` section for free
(ModelConfig is made on import: kinds are registered on import of torchpeer.layers).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from torchpeer.data import DataConfig
from torchpeer.layers import DenseConfig, MoEConfig, PEERConfig, PKMConfig  # noqa: F401  (registers the kinds)
from torchpeer.layers.registry import ffw_kinds, get_ffw
from torchpeer.lm.config_names import closest, misplaced_hint
from torchpeer.optim.fused_tables import FUSED_EXPERT_OPTIMIZERS

SCHEDULES = ("cosine", "wsd", "constant")
LOGIT_PRIORS = ("none", "unigram")
EXPERT_OPTIMIZERS = ("adamw", *FUSED_EXPERT_OPTIMIZERS)


@dataclass
class _ModelFields:
    """Decoder-only transformer.

    ffw: kind of the sparse FFW layers (a registered kind: "dense" | "peer" | "pkm" | "moe" | ...).
    placement: which blocks get the ``ffw`` kind, the others are dense. "middle" = block
        ``n_layers // 2`` (0-based: block 6 of blocks 0..11, the paper's middle layer), "all", "odd"
        (blocks 1, 3, 5, ...: issue 18's four-layer design at any depth), or a list of block indices.
    vocab_size: None = take it from the tokenizer.
    seq_len: context length (training windows and the attention FLOP term).
    logit_prior: "none" (default) | "unigram": a learnable bias on the output logits (the LM head's
        bias), at the start of a run set to the log unigram frequencies of the train split (add-0.5
        smoothed; torchpeer/lm/logit_prior.py). The model then starts at the unigram loss instead of
        learning the unigram prior through its residual stream, which, in the first tens of steps,
        makes every FFW's input one direction and collapses PEER's router (beyond_paper.md, thirtieth
        session). Same FLOPs; vocab_size more parameters.
    One more field per registered FFW kind (``dense``, ``peer``, ...) holds that kind's options.
    """

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    seq_len: int = 256
    vocab_size: int | None = None
    ffw: str = "peer"
    placement: str | list[int] = "middle"
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    logit_prior: str = "none"

    def sparse_blocks(self) -> list[int]:
        """0-based indices of the blocks whose FFW is ``self.ffw`` (empty for dense)."""
        if self.ffw == "dense":
            return []
        if self.placement == "middle":
            return [self.n_layers // 2]
        if self.placement == "all":
            return list(range(self.n_layers))
        if self.placement == "odd":
            return list(range(1, self.n_layers, 2))
        return sorted(self.placement)

    def block_kinds(self) -> list[str]:
        """FFW kind of every block."""
        sparse = set(self.sparse_blocks())
        return [self.ffw if i in sparse else "dense" for i in range(self.n_layers)]

    def validate(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads} "
                "into an even head width (RoPE rotates pairs of dimensions)"
            )
        if self.ffw not in ffw_kinds():
            raise ValueError(f"unknown FFW kind model.ffw={self.ffw!r}; use one of {', '.join(ffw_kinds())}")
        if not hasattr(self, self.ffw):
            raise ValueError(
                f"FFW kind {self.ffw!r} was registered after torchpeer.lm.config was imported, so ModelConfig has "
                f"no [model.{self.ffw}] section; register it on import of torchpeer.layers (layers/__init__.py), "
                "or import its module before torchpeer.lm"
            )
        p = self.placement
        if isinstance(p, str):
            if p not in ("middle", "all", "odd") or (p == "odd" and self.n_layers < 2):
                raise ValueError(f"model.placement={p!r} is not valid; use middle, all, odd (2+ blocks) or indices")
        elif isinstance(p, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            bad = [i for i in p if not 0 <= i < self.n_layers]
            if bad or len(set(p)) != len(p) or not p:
                raise ValueError(f"model.placement={p} must list distinct block indices in 0..{self.n_layers - 1}")
        else:
            raise TypeError(f"model.placement must be 'middle', 'all', 'odd' or a list of ints, got {p!r}")
        if self.logit_prior not in LOGIT_PRIORS:
            choices = ", ".join(LOGIT_PRIORS)
            raise ValueError(f"model.logit_prior={self.logit_prior!r} is not valid; use one of {choices}")
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or self.vocab_size < 2):
            raise ValueError(f"model.vocab_size must be >= 2 (or omitted), got {self.vocab_size!r}")
        for kind in ffw_kinds():  # e.g. n_experts = 1024.0 names model.peer.n_experts, before the layer sees it
            if hasattr(self, kind):
                section, want = getattr(self, kind), get_ffw(kind).config_cls
                if not isinstance(section, want):  # e.g. ModelConfig(peer={"n_experts": 256}) in Python
                    raise TypeError(
                        f"model.{kind} must be a {want.__name__}, got {type(section).__name__} {section!r}; "
                        f"e.g. {kind}={want.__name__}(...) (from {want.__module__} import {want.__name__})"
                    )
                check_field_types(section, f"model.{kind}")


def _model_config_class() -> type:
    """ModelConfig = the fields above + one section per registered FFW kind (default: its defaults)."""
    sections = [(k, get_ffw(k).config_cls, field(default_factory=get_ffw(k).config_cls)) for k in ffw_kinds()]
    cls = dataclasses.make_dataclass("ModelConfig", sections, bases=(_ModelFields,))
    cls.__module__, cls.__doc__ = __name__, _ModelFields.__doc__
    return cls


ModelConfig = _model_config_class()


@dataclass
class TrainConfig:
    """Optimisation, budget, logging and checkpointing.

    The run stops at the first of max_steps / max_tokens / max_flops that is set (None = unset;
    at least one must be set). max_flops uses the training FLOPs per token of ``torchpeer info``.
    schedule: "cosine" (warmup, cosine to min_lr_ratio*lr), "wsd" (warmup, stable, linear decay
    over the last decay_frac of the steps), "constant" (warmup then flat).
    expert_lr: lr of the expert tables (PEER.down/up, PKM values); None = lr.
    expert_lr_final: the expert tables' lr at the last step (UltraMem-style value-lr schedule);
        None (default) = constant expert_lr. When set, the tables' lr before the schedule goes
        linearly from expert_lr (or lr) at step 0 to expert_lr_final at the last step, and the
        schedule (warmup, cosine, ...) multiplies it as every group's (lm/optim.py ExpertLRRamp).
    expert_optimizer: "adamw" (the tables are AdamW parameters), or a fused lazy Adam updating the selected
        PEER rows inside the mixing backward (torchpeer.optim.attach_rowwise_adam: Triton, grad_accum 1, table
        gradients not clipped; column-sharded under torchrun; a shared pool: one deferred pass after backward)
        with an fp32 first moment per element and (update bytes per element a step): "rowwise_adam" one fp32
        second moment per ROW (16); "rowwise_adam_bf16" that with bf16 working tables, fp32 masters in the
        optimizer (18); "elementwise_adam" an fp32 second moment per ELEMENT, AdamW's rule (24; +4 bytes of
        state); "elementwise_adam_bf16" that with bf16 tables (26). CPU proxy: element-wise matched AdamW.
    dtype: "bf16" autocasts on CUDA; CPU always runs float32.
    eval_batches: batches per eval set at each evaluation (None = the whole split).
    track_usage: also log each routed layer's expert usage % and KL over the training tokens of each
        log window (log_interval steps; a metrics line's "routing"), so a router's collapse shows when
        it happens, not only at the end; costs one index_add per routed layer a forward. A window's
        usage depends on its tokens: compare it only between runs of the same tokens per window.
    checkpoint: write checkpoints (every ckpt_interval steps, at the end and when interrupted);
        False for throwaway runs whose checkpoints would be large (a 1M-expert PEER model's are GBs).
    loss_chunk_tokens: 0 (default) = the training loss from the whole (tokens, vocab) logits; N > 0 =
        the LM head and loss N tokens at a time, never the whole logits (torchpeer/lm/chunked_loss.py:
        the same loss and gradients up to float rounding, ~tokens x vocab x 16 bytes less memory).
    """

    device: str = "auto"
    seed: int = 0
    batch_size: int = 32
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None
    max_flops: float | None = None
    lr: float = 1e-3
    expert_lr: float | None = None
    expert_lr_final: float | None = None
    expert_optimizer: str = "adamw"
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_frac: float = 0.2
    weight_decay: float = 0.1
    expert_weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "bf16"
    compile: bool = False
    log_interval: int = 10
    track_usage: bool = False
    eval_interval: int = 200
    eval_batches: int | None = 50
    eval_batch_size: int | None = None
    ckpt_interval: int = 200
    keep_checkpoints: int = 2
    checkpoint: bool = True
    tensorboard: bool = True
    loss_chunk_tokens: int = 0

    @property
    def table_lr(self) -> float:
        """The expert tables' lr before the schedule and the ramp: expert_lr, else lr."""
        return self.lr if self.expert_lr is None else self.expert_lr

    def validate(self) -> None:
        check_field_types(self, "train")
        for name in ("batch_size", "grad_accum", "log_interval", "eval_interval", "ckpt_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_steps is None and self.max_tokens is None and self.max_flops is None:
            raise ValueError("set at least one of train.max_steps, train.max_tokens, train.max_flops")
        for name in ("max_steps", "max_tokens", "max_flops", "lr", "expert_lr", "expert_lr_final", "eps"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"train.{name} must be a positive finite number, got {v!r}")
        if self.loss_chunk_tokens < 0:
            raise ValueError(
                f"train.loss_chunk_tokens must be 0 (off) or a number of tokens, got {self.loss_chunk_tokens}"
            )
        for name in ("warmup_steps", "weight_decay", "expert_weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"train.{name} must be >= 0, got {v!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("eval_batches", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"train.{name} must be a positive integer (or none), got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.expert_optimizer not in EXPERT_OPTIMIZERS:
            choices = ", ".join(EXPERT_OPTIMIZERS)
            raise ValueError(f"train.expert_optimizer={self.expert_optimizer!r}; use one of {choices}")
        if self.expert_optimizer in FUSED_EXPERT_OPTIMIZERS and self.grad_accum > 1:
            raise ValueError(
                f"train.expert_optimizer={self.expert_optimizer} updates the tables inside the backward: "
                f"use train.grad_accum 1 (now {self.grad_accum}; raise train.batch_size instead)"
            )
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"train.dtype={self.dtype!r}; use 'bf16' or 'fp32'")
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        for name in ("decay_frac", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"train.{name} must be in [0, 1], got {getattr(self, name)!r}")


@dataclass
class RunConfig:
    """A whole run: ``name`` (default: the config file's stem), model, train and data."""

    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        for name, cls in (("model", ModelConfig), ("train", TrainConfig), ("data", DataConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls):  # e.g. RunConfig(model={"d_model": 64}) in Python
                raise TypeError(
                    f"{name} must be a {cls.__name__}, got {type(value).__name__} {value!r}; "
                    "build a config from nested dicts with RunConfig.from_dict({...})"
                )
        self.model.validate()
        self.train.validate()
        self.data.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build and validate from a nested dict (config.json, a parsed TOML file)."""
        cfg = from_dict(cls, d)
        cfg.validate()
        return cfg


# ----------------------------------------------------------------------------- field types


def type_args(tp) -> tuple[Any, ...]:
    """The members of a union annotation (``int | None`` -> (int, NoneType)), else (tp,)."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def type_name(tp) -> str:
    """Readable name of an annotation: ``int or none``."""
    return " or ".join(
        "none" if t is type(None) else getattr(t, "__name__", str(t)).replace("typing.", "") for t in type_args(tp)
    )


def is_instance(value: Any, tp) -> bool:
    """Strict isinstance for config annotations: bool is not an int, a float field accepts ints."""
    for t in type_args(tp):
        if t is type(None) and value is None:
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t in (int, str, bool) and type(value) is t:
            return True
        origin = typing.get_origin(t)
        if origin is list and isinstance(value, list):
            return all(is_instance(v, typing.get_args(t)[0]) for v in value)
        if origin is dict and isinstance(value, dict):
            return all(is_instance(v, typing.get_args(t)[1]) for v in value.values())
    return False


@functools.cache
def field_types(cls: type) -> types.MappingProxyType:
    """{field name: its resolved type} of config dataclass ``cls`` (read-only), resolved once per class:
    ``typing.get_type_hints`` evaluates every annotation string on each call, which made it ~40 % of
    planning a sweep (each run's config is loaded and checked field by field)."""
    return types.MappingProxyType(typing.get_type_hints(cls))


def check_field_types(obj, prefix: str) -> None:
    """Raise TypeError naming the first field of dataclass ``obj`` whose value has the wrong type."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not dataclasses.is_dataclass(hints[f.name]) and not is_instance(value, hints[f.name]):
            raise TypeError(
                f"{prefix}.{f.name} must be of type {type_name(hints[f.name])}, got {value!r}"
                + quoted_hint(value, hints[f.name], f.name)
            )


# ----------------------------------------------------------------------------- dict -> dataclass


def from_dict(cls, d: dict[str, Any], prefix: str = "", root=None):
    """Build dataclass ``cls`` from a nested dict (not validated); unknown keys are a ValueError
    (naming the table a key belongs to when it is a field of another table of ``root``, the top class)."""
    if cls is DataConfig:
        try:
            return DataConfig.from_dict(d)
        except TypeError as e:
            raise TypeError(f"[data]: {e}") from None
    if not isinstance(d, dict):
        raise TypeError(f"[{prefix.rstrip('.')}] must be a table, got {d!r}")
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        here = prefix.rstrip(".") or None  # d_model = 64 at the top, or lr = 3e-3 under [model]
        moves = [misplaced_hint(root or cls, str(k), d[k], here) for k in unknown]  # the table each belongs to
        hint = "; ".join(
            h or f"{k!r}: did you mean {m!r}?" for k, h in zip(unknown, moves) if h or (m := closest(str(k), names))
        )
        # every key placed in the wrong table: the hint says where each goes, so no list of this table's keys
        valid = "" if all(moves) else f" (valid keys: {', '.join(names)})"
        raise ValueError(f"unknown config key(s) {unknown} in {where}{'; ' + hint if hint else ''}{valid}")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.", root or cls)
        else:
            kwargs[name] = coerce(value, tp, prefix + name)
    return cls(**kwargs)


def coerce(value: Any, tp, key: str) -> Any:
    """``value`` as field type ``tp`` (ints widened to float, integral floats to int) or a TypeError."""
    for t in type_args(tp):
        if t is type(None) and value is None:
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if t in (str, bool) and type(value) is t:
            return value
        origin = typing.get_origin(t)
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(t)
            return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        if origin is dict and isinstance(value, dict):
            return {str(k): coerce(v, typing.get_args(t)[1], key) for k, v in value.items()}
    raise TypeError(f"config field {key} must be of type {type_name(tp)}, got {value!r}" + quoted_hint(value, tp, key))


def quoted_hint(value: Any, tp, key: str) -> str:
    """For a number or boolean written in quotes in a TOML file (d_model = "128", compile = "true"),
    the line without them; "" for anything else."""
    if not isinstance(value, str):
        return ""
    text, leaf = value.strip(), key.rsplit(".", 1)[-1]
    for t in type_args(tp):
        try:
            if t is bool and text.lower() in ("true", "false"):
                kind, text = "boolean", text.lower()
            elif t in (int, float) and (t is float or float(text).is_integer()):
                kind = "number"
            else:
                continue
        except ValueError:
            continue
        line = f"{text} (in a list)" if "[" in leaf else f"{leaf} = {text}"  # model.placement[1]
        return f"; a TOML {kind} has no quotes: {line}"
    return ""
