"""Config I/O: TOML files, dicts, and the one command-line override syntax of the whole CLI.

Shipped configs live in ``torchpeer/configs/*.toml`` (package data, so they are found when
installed); ``resolve_config_path("ptb-tiny")`` finds them by name (also as ``configs/ptb-tiny.toml``),
any other argument is a path.

Overrides use dotted field names and take their type from the dataclass field::

    --model.d_model 512  --train.max_steps=100  --model.placement 3,7  --data.valid.ptb ptb:test
    --model.peer.top_k 8   (any registered FFW kind's section)

``none`` sets an optional field to None; ``--data.valid.NAME SPEC`` adds/replaces one eval set and
``--data.valid.NAME none`` removes it.
``split_overrides(argv)`` pulls them out of a command line; ``apply_overrides(cfg, pairs)`` sets them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import sys
import typing
from typing import Any

# torchpeer.lm.config (and torchpeer.data) are imported inside the functions that need them: they
# import torch through the layers' config classes, and the command line imports this module for
# split_overrides and list_configs before it knows whether a command needs torch (``--help`` doesn't)
if typing.TYPE_CHECKING:
    from torchpeer.lm.config import RunConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DEFAULT_CONFIG = "ptb-tiny"


# ----------------------------------------------------------------------------- TOML files


def resolve_config_path(name_or_path: str) -> str:
    """A shipped config name (``ptb-tiny``, or ``configs/ptb-tiny.toml`` as the docs write it) or a
    path to a TOML file -> an existing path."""
    if os.path.isfile(name_or_path):
        return name_or_path
    folder, base = os.path.split(os.path.normpath(name_or_path))
    stem = base[:-5] if base.endswith(".toml") and os.path.basename(folder) == "configs" else base
    shipped = os.path.join(CONFIG_DIR, f"{stem}.toml")
    if (stem != base or os.sep not in name_or_path) and os.path.isfile(shipped):
        return shipped
    from torchpeer.lm.config_names import closest

    if not name_or_path.endswith(".toml") and os.path.isfile(name_or_path + ".toml"):
        close = name_or_path + ".toml"  # 'bad' with ./bad.toml here: the file, not a shipped config
    else:
        close = closest(stem.removesuffix(".toml"), list_configs())
    raise FileNotFoundError(  # a sweep spec's base, --config of torchpeer data and the CLI's CONFIG alike
        f"config {name_or_path!r} is neither a file nor a shipped config; shipped configs: {', '.join(list_configs())}"
        + (f"; did you mean {close}?" if close else "")
    )


def list_configs() -> list[str]:
    """Names of the configs shipped in torchpeer/configs."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".toml"))


def read_toml(path: str) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is one clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML ({e})") from None


def load_config(name_or_path: str = DEFAULT_CONFIG, overrides: list[str] | list[tuple[str, str]] | None = None):
    """Read a TOML config (name or path), apply overrides (``["--a.b", "v"]`` or pairs), validate."""
    from torchpeer.lm.config import RunConfig, from_dict

    path = resolve_config_path(name_or_path)
    raw = read_toml(path)
    raw.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    cfg = from_dict(RunConfig, raw)
    apply_overrides(cfg, overrides or [])
    cfg.validate()
    return cfg


def require_run_config(cfg) -> None:
    """TypeError (one line) unless ``cfg`` is a RunConfig: ``train("ptb-tiny", ...)`` says how to read one."""
    from torchpeer.lm.config import RunConfig

    if not isinstance(cfg, RunConfig):
        example = f"load_config({cfg!r})" if isinstance(cfg, str) else "load_config('ptb-tiny')"
        raise TypeError(
            f"the config must be a RunConfig, got {type(cfg).__name__}; read one with "
            f"torchpeer.lm.{example} (a shipped config name or a TOML path; overrides as its second argument)"
        )


def dump_toml(cfg: RunConfig, show_unset: bool = False) -> str:
    """TOML text of a config (None fields are omitted, TOML has no null; ``show_unset`` writes each
    as a comment ``# field = none``, so that every field is listed)."""
    lines: list[str] = []

    def emit(d: dict[str, Any], section: str) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and (v is not None or show_unset)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if section:
            lines.append(f"\n[{section}]")
        for k, v in scalars.items():
            lines.append(f"{k} = {json.dumps(v)}" if v is not None else f"# {k} = none")
        for k, v in tables.items():
            emit(v, f"{section}.{k}" if section else k)

    emit(cfg.to_dict(), "")
    return "\n".join(lines).lstrip("\n") + "\n"


# ----------------------------------------------------------------------------- overrides


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate dotted config overrides (``--a.b V`` / ``--a.b=V``) from the other arguments.

    Returns (the other arguments in order, [(dotted key, value text), ...]).
    """
    rest, pairs, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        key = a[2:].split("=", 1)[0] if a.startswith("--") else ""
        if "." not in key:
            rest.append(a)
            i += 1
            continue
        if "=" in a:
            pairs.append((key, a.split("=", 1)[1]))
            i += 1
        elif i + 1 < len(argv) and not re.match(r"--[A-Za-z]", argv[i + 1]):
            pairs.append((key, argv[i + 1]))
            i += 2
        else:  # the last argument, or followed by another option ('--train.lr --train.max_steps 3')
            after = f" (before {argv[i + 1]})" if i + 1 < len(argv) else ""
            raise ValueError(f"override {a} needs a value{after}: {a} VALUE or {a}=VALUE")
    return rest, pairs


def parse_override_args(args: list[str]) -> list[tuple[str, str]]:
    """``["--model.d_model", "512", "--train.lr=3e-4"]`` -> [("model.d_model", "512"), ...]."""
    rest, pairs = split_overrides(args)
    for a in rest:
        if a.startswith("--") and len(a) > 2:
            raise ValueError(f"unknown option {a}; config overrides are dotted, e.g. --train.max_steps 100")
        raise ValueError(f"unexpected argument {a!r}; overrides look like --model.d_model 512")
    return pairs


def apply_overrides(cfg: RunConfig, overrides: list[str] | list[tuple[str, str]]) -> RunConfig:
    """Set fields of ``cfg`` in place from string overrides (see module docstring)."""
    from torchpeer.data import DataConfig
    from torchpeer.lm.config import field_types

    pairs = parse_override_args(overrides) if overrides and isinstance(overrides[0], str) else overrides
    for key, text in pairs:
        parts = key.split(".")
        obj = cfg
        for i, part in enumerate(parts[:-1]):
            if isinstance(obj, DataConfig) and part == "valid" and i == len(parts) - 2:
                obj = None
                break
            if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
                raise ValueError(f"unknown config field {key!r}; {_suggest(cfg, key, parts[: i + 1])}")
            obj = getattr(obj, part)
        if obj is None:  # --data.valid.NAME SPEC adds or replaces that eval set; SPEC none removes it
            name = parts[-1]
            if text.strip().lower() in ("none", "null"):
                if name not in cfg.data.valid:
                    sets = ", ".join(cfg.data.valid) or "none"
                    raise ValueError(f"--{key} none: there is no eval set {name!r} to remove (eval sets: {sets})")
                cfg.data.valid = {k: v for k, v in cfg.data.valid.items() if k != name}
            else:
                cfg.data.valid = {**cfg.data.valid, name: text}
            continue
        last = parts[-1]
        if not dataclasses.is_dataclass(obj) or last not in {f.name for f in dataclasses.fields(obj)}:
            raise ValueError(f"unknown config field {key!r}; {_suggest(cfg, key, parts)}")
        tp = field_types(type(obj))[last]
        if dataclasses.is_dataclass(tp):
            raise ValueError(f"{key!r} is a section; override one of its fields, e.g. --{key}.<field> VALUE")
        setattr(obj, last, parse_value(text, tp, key))
    return cfg


def _suggest(cfg: RunConfig, key: str, parts: list[str]) -> str:
    """The existing field closest to the misspelt ``key``, then the valid fields where ``parts`` went wrong."""
    if key.rsplit(".", 1)[-1] in ("epochs", "num_epochs", "max_epochs"):
        hint = "runs are sized in steps, tokens or FLOPs, not epochs: use --train.max_tokens "
        hint += "(one pass of the train split: its token count, which torchpeer data prints) "
    else:
        match = closest_field(key, field_names(cfg), f"model.{cfg.model.ffw}.")
        hint = f"did you mean --{match}? " if match else ""
    obj = cfg
    for p in parts[:-1]:
        obj = getattr(obj, p, None)
    if dataclasses.is_dataclass(obj):
        prefix = ".".join(parts[:-1])
        names = [f"{prefix}.{f.name}" if prefix else f.name for f in dataclasses.fields(obj)]
        return f"{hint}valid fields here: {', '.join(names)}"
    return f"{hint}sections are model, train, data"


def closest_field(key: str, names: list[str], prefer: str = "") -> str | None:
    """The dotted field most like ``key`` among those whose last part is like ``key``'s (so that
    ``trian.max_steps`` finds ``train.max_steps`` but ``model.dropout`` finds nothing, not a field
    that only shares the ``model.`` prefix), fields under ``prefer`` (the model's FFW section)
    first among equals; or None."""
    import difflib

    from torchpeer.lm.config_names import OTHER_NAMES, closest

    leaf = key.rsplit(".", 1)[-1]
    meant = OTHER_NAMES.get(leaf, "").split()  # another library's name: only the fields it means
    similar = [n for n in names if n.rsplit(".", 1)[-1] in meant] or [
        n for n in names if closest(leaf, [n.rsplit(".", 1)[-1]])
    ]
    if not similar:
        return None

    def score(name: str) -> float:
        return difflib.SequenceMatcher(None, key, name).ratio() + (0.05 if prefer and name.startswith(prefer) else 0)

    return max(similar, key=score)


@functools.cache
def run_config_fields() -> tuple[str, ...]:
    """``field_names(RunConfig())``, built once: the spec checks and hints ask for it per key."""
    from torchpeer.lm.config import RunConfig

    return tuple(field_names(RunConfig()))


def field_names(obj, prefix: str = "") -> list[str]:
    """Every dotted field name of a config dataclass: "train.max_steps", "model.peer.top_k", ..."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f"{prefix}{f.name}"
        out += field_names(value, name + ".") if dataclasses.is_dataclass(value) else [name]
    return out


def parse_value(text: str, tp, key: str) -> Any:
    """Parse a command-line string into the field type ``tp`` (ValueError says what is expected)."""
    from torchpeer.lm.config import coerce, type_args, type_name

    low = text.strip().lower()
    for t in type_args(tp):
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
                power = re.fullmatch(r"\s*(\d+)\s*(?:\*\*|\^)\s*(\d+)\s*", text)  # 1024**2, 256^2 as the docs write N
                if power:
                    return int(power.group(1)) ** int(power.group(2))
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
                return coerce(json.loads(text), t, key)
            if t is str:
                if len(type_args(tp)) > 1 and re.fullmatch(r"\[?[\d,\s]+\]?", text):
                    continue  # e.g. placement "3,7" or "5": let the list branch parse it
                return text
        except (ValueError, TypeError, json.JSONDecodeError):
            continue
    raise ValueError(f"cannot parse --{key} {text!r} as {type_name(tp)}{_value_hint(tp, key)}")


def _value_hint(tp, key: str) -> str:
    """What a value of type ``tp`` looks like on the command line, for the parse error."""
    from torchpeer.lm.config import type_args

    kinds = type_args(tp)
    if any(typing.get_origin(t) is dict for t in kinds):
        if key == "data.valid":
            return "; give one eval set as --data.valid.NAME SOURCE (e.g. --data.valid.ptb ptb:valid) or a JSON object"
        return "; give a JSON object"
    if bool in kinds:
        return "; use true or false"
    if int in kinds and float not in kinds:  # '2.5' for a count: 'give a number' would not say what is wrong
        return "; give a whole number, e.g. 64 or 2e6" + (" or none" if type(None) in kinds else "")
    if float in kinds:
        return "; give a number, e.g. 2e6" + (" or none" if type(None) in kinds else "")
    return ""
