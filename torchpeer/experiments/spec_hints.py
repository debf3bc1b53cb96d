"""Hints for keys put where a sweep spec does not take them (spec.py's errors): a dotted config
field written without quotes (TOML reads ``train.lr = 3e-3`` as the table ``train`` holding ``lr``),
a config field or table in [sweep] or above every table, a misspelt [sweep] field or table name.
Each returns the line's end that says what to write instead."""

from __future__ import annotations

import json
from typing import Any

from torchpeer.experiments.spec_fields import SIZED_BY, STOP_FIELDS, toml_key_value


def unquoted_field(prefix: str, table: dict) -> tuple[str, Any] | None:
    """The first config field of ``table`` read under ``prefix`` (``train`` + {"lr": [..]} ->
    ("train.lr", [..])): what TOML makes of a dotted key written without quotes (``train.lr = 3e-3``
    is the table ``train`` holding ``lr``). None when no leaf is a config field."""
    from torchpeer.lm.config_io import run_config_fields

    fields = run_config_fields()
    for key, value in table.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            found = unquoted_field(name, value)
            if found:
                return found
        elif name in fields or name.startswith("data.valid."):
            return name, value
    return None


def unquoted_message(field_value: tuple[str, Any], what: str, where: str) -> str:
    """One line: the dotted key as written, why TOML reads it as a table, and the line to write."""
    key, value = field_value
    return (
        f"{where}: {what} {key} = {json.dumps(value)} has no quotes around its key, so TOML reads it as a "
        f"table; quote the field: {toml_key_value(key, value)}"
    )


def config_field_like(key: str, value: Any) -> tuple[str, Any] | None:
    """(dotted config field, value) when ``key`` names one, quoted (``"train.lr"``), unquoted (a
    table: ``{"lr": ..}`` under ``train``) or by its last part (``lr``); else None. For a key put
    in a table of the spec that holds no config fields ([sweep], or none at all)."""
    from torchpeer.lm.config_io import closest_field, run_config_fields

    if isinstance(value, dict):
        return unquoted_field(key, value)
    match = closest_field(key, list(run_config_fields()))
    # a bare name only when it is a field's own (seed -> train.seed), not a likeness (a [sweep] field's)
    return (match, value) if match is not None and ("." in key or match.rsplit(".", 1)[-1] == key) else None


def table_hint(key: str, value: Any, tables: tuple[str, ...], sweep_keys: dict[str, str]) -> str:
    """What a key of no known table most likely is: a [sweep] field above the first table header, a
    table of a run config ([train]: its fields go in [base]), or a misspelt table name."""
    from torchpeer.lm.config_names import closest

    if not isinstance(value, dict):
        table = "[sweep]" if key in sweep_keys else "the table it belongs to"
        return f"; {key} = {json.dumps(value)} comes before every table header, so it is in none: move it under {table}"
    if found := config_field_like(key, value):
        example = toml_key_value(*found)
        return f"; [{key}] is a table of a run config: give its fields for every run in [base], as {example}"
    close = closest(key, tables)
    return f"; did you mean [{close}]?" if close else ""


def sweep_hint(key: str, value: Any, sweep_keys: dict[str, str]) -> str:
    """The end of the error for an unknown [sweep] field: the config field it is (those go in
    [base]), else the [sweep] field it resembles, else every [sweep] field and what it takes."""
    from torchpeer.lm.config_names import closest

    if found := config_field_like(key, value):
        if found[0] in STOP_FIELDS:  # plan.py sets these per run
            return SIZED_BY
        return f"config fields go in [base] (every run) or in a variant, as {toml_key_value(*found)}"
    if close := closest(key, sweep_keys):
        return f"did you mean {close}? ({close}: {sweep_keys[close]})"
    return "known fields: " + "; ".join(f"{k}: {v}" for k, v in sweep_keys.items())
