"""The dotted config fields of a sweep spec, checked at load time against RunConfig (spec.py's
[base], [variants] and [grid] tables): an unknown field names the closest one as the spec writes it,
and a value of the wrong type is refused in the spec's own terms."""

from __future__ import annotations

import json
from typing import Any

# Set per run from the spec's budgets or tokens (plan.py): a value given in the spec would be dropped.
STOP_FIELDS = ("train.max_steps", "train.max_tokens", "train.max_flops")
SIZED_BY = "a sweep sizes each run by [sweep] budgets = [...] (training FLOPs) or tokens = [...], or a variant's own"


def check_field(key: str, value: Any, what: str, where: str, values: list | None = None) -> None:
    """An unknown dotted field is a ValueError naming the closest one *as the spec writes it*
    (``"train.lr" = 0.001``), not in the ``--train.lr`` form of the CLI's message: the user is
    editing a TOML file. Checked here, at load time, so the error also names the table it is in; so is
    the type of the value (of each of ``values``, a [grid] axis's list, when given)."""
    from torchpeer.lm.config_io import closest_field, run_config_fields

    parts = key.split(".")
    if parts[:2] == ["data", "valid"] and len(parts) == 3:
        return  # "data.valid.NAME" adds an eval set: any name
    fields = list(run_config_fields())
    sections = {".".join(f.split(".")[:i]) for f in fields for i in range(1, f.count(".") + 1)}
    if key in STOP_FIELDS:
        raise ValueError(f"{where}: {what} {toml_key_value(key, value)} would be ignored: {SIZED_BY}")
    if key in fields:
        for v in [value] if values is None else values:
            check_value(key, v, what, where)
        return
    if key in sections:
        raise ValueError(f'{where}: {what} {key} is a section; set one of its fields, e.g. "{key}.<field>" = VALUE')
    if parts[-1] in ("epochs", "num_epochs", "max_epochs"):
        hint = "runs are sized by [sweep] budgets or tokens (or a variant's own), not epochs"
    elif (match := closest_field(key, fields)) is not None:
        hint = f"did you mean {toml_key_value(match, value)}?"
    else:  # nothing alike: list what the deepest valid section of the key holds
        known = [p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if p in sections]
        if known:
            names = sorted({f[len(known[0]) + 1 :].split(".")[0] for f in fields if f.startswith(known[0] + ".")})
            hint = f"fields of {known[0]}: {', '.join(names)}"
        else:
            hint = f"sections are {', '.join(sorted(s for s in sections if '.' not in s))}"
    raise ValueError(f"{where}: unknown config field {key!r} in {what}; {hint}")


def check_value(key: str, value: Any, what: str, where: str) -> None:
    """A value of the wrong type (``"train.lr" = "fast"``, ``"model.n_layers" = 2.5``) is refused at
    load time in the spec's own terms, naming its table, instead of the CLI's ``cannot parse
    --train.lr 'fast'`` when the first run is planned."""
    import dataclasses

    from torchpeer.lm.config import RunConfig, field_types
    from torchpeer.lm.config_io import parse_value

    obj, tp = RunConfig(), None
    for part in key.split("."):
        tp = field_types(type(obj))[part]
        obj = getattr(obj, part)
    if dataclasses.is_dataclass(tp):
        return  # a section: check_field says so
    try:
        parse_value(override_text(value), tp, key)
    except ValueError as e:
        wanted = str(e).split(" as ", 1)[-1]  # "float; give a number, e.g. 2e6"
        raise ValueError(f"{where}: {what} {toml_key_value(key, value)} is not of type {wanted}") from None


def toml_key_value(key: str, value: Any) -> str:
    """``"train.lr" = 0.001``: a dotted field as a line of a spec (quoted key, TOML value)."""
    text = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)
    return f"{json.dumps(key)} = {text}"


def override_text(value: Any) -> str:
    """A TOML value as the string ``--FIELD VALUE`` takes (lists as JSON, booleans lower-case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return json.dumps(value)
    return str(value)
