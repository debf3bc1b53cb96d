"""Run configuration: dataclasses, TOML loading and command-line overrides.

A run config is a TOML file with three tables, each mapped onto a dataclass below::

    [model]            ModelConfig   (+ [model.dense] [model.peer] [model.pkm] [model.moe])
    [train]            TrainConfig
    [data]             torchpeer.data.DataConfig  (+ [data.valid])

Shipped configs live in ``torchpeer/configs/*.toml`` (package data, so they are found when
installed); ``resolve_config_path("ptb-tiny")`` finds them by name, any other argument is a path.

Overrides use dotted field names and take their type from the dataclass field::

    --model.d_model 512  --train.max_steps=100  --model.placement 3,7  --data.valid.ptb ptb:test

``none`` sets an optional field to None; ``--data.valid.NAME SPEC`` adds/replaces one eval set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from torchpeer.data import DataConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FFW_KINDS = ("dense", "peer", "pkm", "moe")
SCHEDULES = ("cosine", "wsd", "constant")
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = "ptb-tiny"


@dataclass
class DenseConfig:
    """Options of ``torchpeer.dense.DenseFFW`` (d_hidden None = 4 * d_model)."""

    d_hidden: int | None = None
    activation: str | None = None
    swiglu: bool = False


@dataclass
class PEERConfig:
    """Options of ``torchpeer.peer.PEER``."""

    n_experts: int = 1024**2
    heads: int = 8
    top_k: int = 16
    d_key: int = 128
    activation: str = "gelu"
    gate: str = "softmax"
    query_norm: str = "batch"
    shared_keys: bool = True
    backend: str = "auto"


@dataclass
class PKMConfig:
    """Options of ``torchpeer.pkm.PKM`` (None = the module's default: d_key 256, value_dim d_model)."""

    n_keys: int = 1024
    heads: int = 8
    top_k: int = 32
    d_key: int | None = None
    query_norm: str = "batch"
    value_dim: int | None = None


@dataclass
class MoEConfig:
    """Options of ``torchpeer.moe.MoE``; ``aux_loss_weight`` scales the token-choice balance loss."""

    n_experts: int = 128
    d_expert: int | None = None
    routing: str = "expert_choice"
    capacity_factor: float = 1.0
    top_k: int = 1
    activation: str = "gelu"
    aux_loss_weight: float = 0.01


@dataclass
class ModelConfig:
    """Decoder-only transformer.

    ffw: kind of the sparse FFW layers ("dense" | "peer" | "pkm" | "moe").
    placement: which blocks get the ``ffw`` kind, the others are dense. "middle" = block
        ``n_layers // 2`` (0-based: block 6 of blocks 0..11, the paper's middle layer), "all",
        or a list of 0-based block indices.
    vocab_size: None = take it from the tokenizer.
    seq_len: context length (training windows and the attention FLOP term).
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
    dense: DenseConfig = field(default_factory=DenseConfig)
    peer: PEERConfig = field(default_factory=PEERConfig)
    pkm: PKMConfig = field(default_factory=PKMConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def sparse_blocks(self) -> list[int]:
        """0-based indices of the blocks whose FFW is ``self.ffw`` (empty for dense)."""
        if self.ffw == "dense":
            return []
        if self.placement == "middle":
            return [self.n_layers // 2]
        if self.placement == "all":
            return list(range(self.n_layers))
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
        if self.ffw not in FFW_KINDS:
            raise ValueError(f"unknown FFW kind model.ffw={self.ffw!r}; use one of {', '.join(FFW_KINDS)}")
        p = self.placement
        if isinstance(p, str):
            if p not in ("middle", "all"):
                raise ValueError(f"model.placement={p!r} is not valid; use 'middle', 'all' or a list of block indices")
        elif isinstance(p, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in p):
            bad = [i for i in p if not 0 <= i < self.n_layers]
            if bad or len(set(p)) != len(p) or not p:
                raise ValueError(f"model.placement={p} must list distinct block indices in 0..{self.n_layers - 1}")
        else:
            raise TypeError(f"model.placement must be 'middle', 'all' or a list of ints, got {p!r}")
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or self.vocab_size < 2):
            raise ValueError(f"model.vocab_size must be >= 2 (or omitted), got {self.vocab_size!r}")


@dataclass
class TrainConfig:
    """Optimisation, budget, logging and checkpointing.

    The run stops at the first of max_steps / max_tokens / max_flops that is set (None = unset;
    at least one must be set). max_flops uses the training FLOPs per token of ``torchpeer info``.
    schedule: "cosine" (warmup, cosine to min_lr_ratio*lr), "wsd" (warmup, stable, linear decay
    over the last decay_frac of the steps), "constant" (warmup then flat).
    expert_lr: lr of the expert tables (PEER.down/up, PKM values); None = lr.
    dtype: "bf16" autocasts on CUDA; CPU always runs float32.
    eval_batches: batches per eval set at each evaluation (None = the whole split).
    checkpoint: write checkpoints (every ckpt_interval steps and at the end); False for throwaway
        runs whose checkpoints would be large (a 1M-expert PEER model's are several GB).
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
    eval_interval: int = 200
    eval_batches: int | None = 50
    eval_batch_size: int | None = None
    ckpt_interval: int = 200
    keep_checkpoints: int = 2
    checkpoint: bool = True
    tensorboard: bool = True

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "log_interval", "eval_interval", "ckpt_interval"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"train.{name} must be a positive integer, got {v!r}")
        if self.max_steps is None and self.max_tokens is None and self.max_flops is None:
            raise ValueError("set at least one of train.max_steps, train.max_tokens, train.max_flops")
        for name in ("max_steps", "max_tokens", "max_flops"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"train.{name} must be positive (or none), got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.dtype not in ("bf16", "fp32"):
            raise ValueError(f"train.dtype={self.dtype!r}; use 'bf16' or 'fp32'")
        if self.keep_checkpoints < 1:
            raise ValueError(f"train.keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if not 0.0 <= self.decay_frac <= 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("train.decay_frac and train.min_lr_ratio must be in [0, 1]")


@dataclass
class RunConfig:
    """A whole run: ``name`` (default: the config file's stem), model, train and data."""

    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        self.model.validate()
        self.train.validate()
        self.data.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        cfg = _from_dict(cls, d, "")
        cfg.validate()
        return cfg


# ----------------------------------------------------------------------------- dict <-> dataclass


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls, d: dict[str, Any], prefix: str):
    """Build dataclass ``cls`` from a nested dict; unknown keys are a ValueError."""
    if cls is DataConfig:
        try:
            return DataConfig.from_dict(d)
        except TypeError as e:
            raise TypeError(f"[data]: {e}") from None
    if not isinstance(d, dict):
        raise TypeError(f"[{prefix.rstrip('.')}] must be a table, got {d!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
        raise ValueError(f"unknown config key(s) {unknown} in {where}; valid keys are {names}")
    kwargs = {}
    for name, value in d.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(value, tp, prefix + name)
    return cls(**kwargs)


def _type_args(tp) -> tuple[Any, ...]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _check_type(value: Any, tp, key: str) -> Any:
    """Return ``value`` (ints widened to float where a float is expected) or raise TypeError."""
    for t in _type_args(tp):
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
            return [_check_type(v, item, key) for v in value]
        if origin is dict and isinstance(value, dict):
            return {str(k): _check_type(v, typing.get_args(t)[1], key) for k, v in value.items()}
    raise TypeError(f"config field {key} must be of type {_type_name(tp)}, got {value!r}")


def _type_name(tp) -> str:
    return " or ".join(
        "none" if t is type(None) else getattr(t, "__name__", str(t)).replace("typing.", "") for t in _type_args(tp)
    )


# ----------------------------------------------------------------------------- TOML files


def resolve_config_path(name_or_path: str) -> str:
    """A shipped config name (``ptb-tiny``) or a path to a TOML file -> an existing path."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = os.path.join(CONFIG_DIR, f"{name_or_path}.toml")
    if os.sep not in name_or_path and os.path.isfile(shipped):
        return shipped
    raise FileNotFoundError(
        f"config {name_or_path!r} is neither a file nor a shipped config; shipped configs: {', '.join(list_configs())}"
    )


def list_configs() -> list[str]:
    """Names of the configs shipped in torchpeer/configs."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".toml"))


def load_config(name_or_path: str = DEFAULT_CONFIG, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML config (name or path), apply ``--a.b value`` overrides, validate."""
    path = resolve_config_path(name_or_path)
    with open(path, "rb") as fh:
        try:
            raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML ({e})") from None
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    cfg = _from_dict(RunConfig, raw, "")
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- overrides


def parse_override_args(args: list[str]) -> list[tuple[str, str]]:
    """``["--model.d_model", "512", "--train.lr=3e-4"]`` -> [("model.d_model", "512"), ...]."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ValueError(f"unexpected argument {a!r}; overrides look like --model.d_model 512")
        key = a[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ValueError(f"override {a} needs a value, e.g. {a} 512")
            value = args[i + 1]
            i += 2
        if "." not in key:
            raise ValueError(f"unknown option --{key}; config overrides are dotted, e.g. --train.max_steps 100")
        out.append((key, value))
    return out


def apply_overrides(cfg: RunConfig, overrides: list[str] | list[tuple[str, str]]) -> RunConfig:
    """Set fields of ``cfg`` in place from string overrides (see module docstring)."""
    pairs = parse_override_args(overrides) if overrides and isinstance(overrides[0], str) else overrides
    for key, text in pairs:
        parts = key.split(".")
        obj = cfg
        for i, part in enumerate(parts[:-1]):
            if isinstance(obj, DataConfig) and part == "valid" and i == len(parts) - 2:
                obj = None
                break
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                raise ValueError(f"unknown config field {key!r}; {_suggest(cfg, parts[: i + 1])}")
            obj = getattr(obj, part)
        if obj is None:  # --data.valid.NAME SPEC
            cfg.data.valid = {**cfg.data.valid, parts[-1]: text}
            continue
        last = parts[-1]
        if not dataclasses.is_dataclass(obj) or last not in {f.name for f in dataclasses.fields(obj)}:
            raise ValueError(f"unknown config field {key!r}; {_suggest(cfg, parts)}")
        tp = _hints(type(obj))[last]
        if dataclasses.is_dataclass(tp):
            raise ValueError(f"{key!r} is a section; override one of its fields, e.g. --{key}.<field> VALUE")
        setattr(obj, last, parse_value(text, tp, key))
    return cfg


def _suggest(cfg: RunConfig, parts: list[str]) -> str:
    obj = cfg
    for p in parts[:-1]:
        obj = getattr(obj, p, None)
    if dataclasses.is_dataclass(obj):
        prefix = ".".join(parts[:-1])
        names = [f"{prefix}.{f.name}" if prefix else f.name for f in dataclasses.fields(obj)]
        return f"valid fields here: {', '.join(names)}"
    return "sections are model, train, data"


def parse_value(text: str, tp, key: str) -> Any:
    """Parse a command-line string into the field type ``tp`` (ValueError says what is expected)."""
    low = text.strip().lower()
    for t in _type_args(tp):
        try:
            if t is type(None):
                if low in ("none", "null"):
                    return None
                continue
            if t is bool:
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                continue
            if t is int:
                try:
                    return int(text.replace("_", ""))
                except ValueError:
                    f = float(text)
                    if f.is_integer():
                        return int(f)
                    raise
            if t is float:
                return float(text)
            origin = typing.get_origin(t)
            if origin is list:
                (item,) = typing.get_args(t)
                s = text.strip()
                items = json.loads(s) if s.startswith("[") else [x for x in s.split(",") if x.strip()]
                return [parse_value(str(x), item, key) for x in items]
            if origin is dict:
                value = json.loads(text)
                return _check_type(value, t, key)
            if t is str:
                if len(_type_args(tp)) > 1 and re.fullmatch(r"\[?[\d,\s]+\]?", text):
                    continue  # e.g. placement "3,7" or "5": let the list branch parse it
                return text
        except (ValueError, TypeError, json.JSONDecodeError):
            continue
    raise ValueError(f"cannot parse --{key} {text!r} as {_type_name(tp)}")


def dump_toml(cfg: RunConfig) -> str:
    """TOML text of a config (None fields are omitted, TOML has no null)."""
    lines: list[str] = []

    def emit(d: dict[str, Any], section: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if section:
            lines.append(f"\n[{section}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {json.dumps(v)}")
        for k, v in tables.items():
            emit(v, f"{section}.{k}" if section else k)

    emit(cfg.to_dict(), "")
    return "\n".join(lines).lstrip("\n") + "\n"
