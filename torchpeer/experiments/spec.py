"""Sweep specs: a TOML file naming a base config, overrides, variants and budgets.

A spec (see docs/experiments.md) has these tables::

    [sweep]                 name, base (shipped config name or path), kind, budgets | tokens, ...
    [base]                  overrides applied to every run: "train.lr" = 1e-3, "data.valid.x" = "..."
    [variants.NAME]         one named variant: overrides + meta keys (family, budgets, tokens, warmup_frac,
                            lr_width_power)
    [grid]                  variants as a cartesian product of axes; an axis is either
                              "model.peer.query_norm" = ["batch", "none"]    (a field and its values)
                            or a table of named options, each a table of overrides + meta keys:
                              [grid.size]
                              s1 = {"model.d_model" = 128, budgets = [1e15]}
    [seeds]                 more seeds of named variants: NAME = {seeds = [1, 2], budgets = [1e15]}
                            adds NAME-seed1 and NAME-seed2, NAME's overrides but for train.seed

A run is one (variant, budget) pair. Override keys are dotted config fields (anything
``torchpeer train --SECTION.FIELD VALUE`` accepts); keys without a dot are meta keys. Every
problem (unknown key, empty grid, no budgets, ...) is one ValueError that names it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from torchpeer.experiments.spec_fields import check_field, toml_key_value
from torchpeer.experiments.spec_hints import sweep_hint, table_hint, unquoted_field, unquoted_message

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SPEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "specs")
KINDS = ("isoflop", "ablation", "grid")
TABLES = ("sweep", "base", "variants", "grid", "seeds")
SWEEP_KEYS = {
    "name": "run-folder prefix and report title (default: the file's stem)",
    "description": "free text, shown by --dry-run",
    "base": "shipped config name (e.g. gpu-dense-small) or a path to a TOML config",
    "kind": f"one of {', '.join(KINDS)}: which report sections apply",
    "budgets": "training-FLOP budgets, e.g. [1e15, 3e15]",
    "tokens": "token counts (instead of budgets), e.g. [2e6, 4e6]",
    "warmup_frac": "warmup steps as a fraction of each run's steps (but a variant's own warmup_frac or "
    "train.warmup_steps)",
    "eval_set": "the eval set the report ranks runs by (default: the first of data.valid)",
    "max_epochs": "the data rule, a positive number such as max_epochs = 4 (the most passes over the train split a run "
    "in the fits may make; runs beyond it are marked and left out of the fits)",
    "lr_width_ref": "a positive d_model such as lr_width_ref = 128, the width the spec's lrs are given at (each "
    "run's lrs, train.lr and the tables', are scaled by lr_width_ref / its model.d_model)",
    "lr_width_power": "a positive exponent such as lr_width_power = 0.5 (default 1; with lr_width_ref): each run's "
    "lrs are scaled by (lr_width_ref / its model.d_model) ** lr_width_power",
    "x": "ablation x-axis: a dotted config field or a product of them (model.peer.heads*model.peer.top_k)",
    "series": "ablation: a dotted config field, one line per value (e.g. model.peer.query_norm), or family",
}
VARIANT_META_KEYS = ("family", "budgets", "tokens", "warmup_frac", "lr_width_power")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$")


@dataclass
class Variant:
    """One model/training setting: ``overrides`` maps dotted fields to TOML values."""

    name: str
    overrides: dict[str, Any]
    family: str | None = None  # None = the run's model.ffw
    budgets: list[float] | None = None  # None = the sweep's
    tokens: list[int] | None = None
    warmup_frac: float | None = None  # None = the sweep's (or the variant's own train.warmup_steps)
    lr_width_power: float | None = None  # None = the sweep's (a family whose best lr falls faster with width)


@dataclass
class SweepSpec:
    name: str
    base: str
    kind: str = "grid"
    description: str = ""
    budgets: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    base_overrides: dict[str, Any] = field(default_factory=dict)
    variants: list[Variant] = field(default_factory=list)
    warmup_frac: float | None = None
    eval_set: str | None = None
    max_epochs: float | None = None  # None = no data rule
    lr_width_ref: float | None = None  # None = the lrs as given (plan.py: width-scaled lrs)
    lr_width_power: float = 1.0  # the lrs scale by (lr_width_ref / d_model) ** lr_width_power
    x: str | None = None
    series: str | None = None
    path: str | None = None


# ----------------------------------------------------------------------------- loading


def list_specs() -> list[str]:
    """Names of the specs shipped in torchpeer/experiments/specs."""
    return sorted(f[:-5] for f in os.listdir(SPEC_DIR) if f.endswith(".toml")) if os.path.isdir(SPEC_DIR) else []


def resolve_spec_path(name_or_path: str) -> str:
    """A shipped spec name (``isoflop``) or a path to a TOML file -> an existing path."""
    if os.path.isfile(name_or_path):
        return name_or_path
    shipped = os.path.join(SPEC_DIR, f"{name_or_path}.toml")
    if os.sep not in name_or_path and os.path.isfile(shipped):
        return shipped
    from torchpeer.lm.config_names import closest

    close = closest(os.path.basename(os.path.normpath(name_or_path)).removesuffix(".toml"), list_specs())
    raise FileNotFoundError(
        f"sweep spec {name_or_path!r} is neither a file nor a shipped spec; shipped specs: {', '.join(list_specs())}"
        + (f"; did you mean {close}?" if close else "")
    )


def load_spec(name_or_path: str) -> SweepSpec:
    """Read and check a spec (shipped name or path)."""
    path = resolve_spec_path(name_or_path)
    with open(path, "rb") as fh:
        try:
            raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML ({e})") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    return parse_spec(raw, default_name=stem, path=path)


def parse_spec(raw: dict[str, Any], default_name: str = "sweep", path: str | None = None) -> SweepSpec:
    """Build a SweepSpec from the dict of a TOML file (``path`` only for messages and relative bases)."""
    where = path or "the spec"
    unknown = sorted(set(raw) - set(TABLES))
    if unknown:
        raise ValueError(
            f"{where}: unknown table(s) {unknown}; a spec has [sweep], [base], [variants.NAME], [grid], [seeds]"
            + table_hint(unknown[0], raw[unknown[0]], TABLES, SWEEP_KEYS)
        )
    sweep = _table(raw.get("sweep"), "[sweep]", where)
    unknown = sorted(set(sweep) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(
            f"{where}: unknown field(s) {unknown} in [sweep]; " + sweep_hint(unknown[0], sweep[unknown[0]], SWEEP_KEYS)
        )
    if "base" not in sweep:
        raise ValueError(f"{where}: [sweep] needs base = a shipped config name (e.g. 'ptb-tiny') or a config path")
    spec = SweepSpec(
        name=_str(sweep.get("name", default_name), "sweep.name", where),
        base=_resolve_base(_str(sweep["base"], "sweep.base", where), path),
        kind=_str(sweep.get("kind", "grid"), "sweep.kind", where),
        description=_str(sweep.get("description", ""), "sweep.description", where),
        path=path,
    )
    _check_name(spec.name, "sweep.name", where)
    if spec.kind not in KINDS:
        raise ValueError(f"{where}: sweep.kind = {spec.kind!r}; use one of {', '.join(KINDS)}")
    spec.budgets, spec.tokens = _budgets(sweep, "[sweep]", where)
    if spec.budgets and spec.tokens:
        raise ValueError(f"{where}: [sweep] gives both budgets and tokens; give one of them")
    if "warmup_frac" in sweep:
        spec.warmup_frac = _fraction(sweep["warmup_frac"], "sweep.warmup_frac", where)
    spec.max_epochs, spec.lr_width_ref = _positive(sweep, "max_epochs", where), _positive(sweep, "lr_width_ref", where)
    spec.lr_width_power = _positive(sweep, "lr_width_power", where) or 1.0
    if "lr_width_power" in sweep and spec.lr_width_ref is None:
        raise ValueError(f"{where}: sweep.lr_width_power needs lr_width_ref = the d_model the spec's lrs are given at")
    for key in ("eval_set", "x", "series"):
        if key in sweep:
            setattr(spec, key, _str(sweep[key], f"sweep.{key}", where))
    if spec.kind == "ablation" and spec.x is None:
        raise ValueError(f"{where}: an ablation needs [sweep] x = the field it varies, e.g. 'model.peer.n_experts'")

    spec.base_overrides = _overrides(_table(raw.get("base"), "[base]", where), "[base]", where, meta=())
    variants = [
        _variant(name, _table(v, f"[variants.{name}]", where), f"[variants.{name}]", where)
        for name, v in _table(raw.get("variants"), "[variants]", where).items()
    ]
    variants += _grid_variants(_table(raw.get("grid"), "[grid]", where), where)
    variants += _seed_variants(_table(raw.get("seeds"), "[seeds]", where), variants, spec, where)
    if not variants:
        raise ValueError(f"{where}: the sweep has an empty grid: add [variants.NAME] tables or [grid] axes")
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: variant name(s) {dup} given more than once")
    for v in variants:
        if not (v.budgets or v.tokens or spec.budgets or spec.tokens):
            raise ValueError(
                f"{where}: variant {v.name!r} has no budgets: set [sweep] budgets = [...] (training FLOPs) "
                "or tokens = [...], or budgets in the variant"
            )
    if spec.lr_width_ref is None and (v := next((v for v in variants if v.lr_width_power), None)):
        raise ValueError(f"{where}: variant {v.name!r} sets lr_width_power; it needs [sweep] lr_width_ref = the "
                         "d_model the spec's lrs are given at")  # fmt: skip
    spec.variants = variants
    return spec


def _resolve_base(base: str, spec_path: str | None) -> str:
    """A base path is taken relative to the spec's folder when it exists there."""
    if spec_path and not os.path.isabs(base) and base.endswith(".toml"):
        beside = os.path.join(os.path.dirname(os.path.abspath(spec_path)), base)
        if os.path.isfile(beside):
            return beside
    return base


# ----------------------------------------------------------------------------- variants


def _variant(name: str, table: dict[str, Any], what: str, where: str) -> Variant:
    _check_name(name, f"variant {what}", where)
    budgets, tokens = _budgets(table, what, where)
    family = table.get("family")
    if family is not None:
        family = _str(family, f"{what} family", where)
    overrides = _overrides(table, what, where)
    frac = table.get("warmup_frac")
    if frac is not None:
        frac = _fraction(frac, f"{what} warmup_frac", where)
        if "train.warmup_steps" in overrides:
            raise ValueError(
                f"{where}: {what} sets both warmup_frac and train.warmup_steps; keep one (warmup_frac scales "
                "with each run's steps)"
            )
    power = table.get("lr_width_power")
    if power is not None and (isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 < power < 1e3):
        raise ValueError(f"{where}: {what} lr_width_power = {power!r}: give a positive exponent such as 1.0")
    return Variant(name, overrides, family, budgets or None, tokens or None, frac, power)


def _fraction(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{where}: {what} must be a number in [0, 1), e.g. 0.05, got {value!r}")
    return float(value)


def _grid_variants(grid: dict[str, Any], where: str) -> list[Variant]:
    """The cartesian product of the [grid] axes (first axis outermost), named ``opt1-opt2-...``
    (an option of a field axis is named ``FIELD=VALUE`` by the field's last part, e.g. heads=8)."""
    if not grid:
        return []
    axes: list[list[tuple[str, dict[str, Any]]]] = []
    for axis, values in grid.items():
        if isinstance(values, list):  # "model.x.y" = [v1, v2]: a field and its values
            if "." not in axis:
                raise ValueError(f"{where}: [grid] axis {axis!r} is a list, so it must be a dotted config field")
            check_field(axis, values, "[grid]", where, values=values)  # named here, with its list, not per variant
            options = [(f"{axis.split('.')[-1]}={_value_name(v)}", {axis: v}) for v in values]
        elif isinstance(values, dict):  # [grid.AXIS] NAME = {overrides}
            if "." not in axis and (found := unquoted_field(axis, values)):  # train.lr = [...] unquoted
                raise ValueError(unquoted_message(found, "[grid]", where))
            loose = [(name, opt) for name, opt in values.items() if not isinstance(opt, dict)]
            if loose:  # [grid.size] "model.d_model" = [16, 32]: a field axis written as a named one
                raise ValueError(
                    f"{where}: [grid.{axis}] {toml_key_value(*loose[0])}: the options of a named axis are tables "
                    f"(e.g. s1 = {{ {toml_key_value(*_first_value(*loose[0]))} }}); a field and its list of "
                    f"values go in [grid] itself: {toml_key_value(*loose[0])}"
                )
            options = [(name, _table(opt, f"[grid.{axis}.{name}]", where)) for name, opt in values.items()]
            for name, opt in options:  # a misspelt field is named in its own option, not a combination
                _overrides(opt, f"[grid.{axis}.{name}]", where)
        else:
            raise ValueError(f"{where}: [grid] {axis} must be a list of values or a table of named options")
        if not options:
            raise ValueError(f"{where}: the sweep has an empty grid: axis {axis!r} has no values")
        axes.append(options)
    variants = []
    for combo in itertools.product(*axes):
        table: dict[str, Any] = {}
        budgets: list[list[float]] = []
        tokens: list[list[int]] = []
        for _, opt in combo:
            b, t = _budgets(opt, "[grid]", where)
            budgets += [b] if b else []
            tokens += [t] if t else []
            table.update({k: v for k, v in opt.items() if k not in ("budgets", "tokens")})
        name = "-".join(n for n, _ in combo)
        v = _variant(name, table, f"grid variant {name!r}", where)
        v.budgets, v.tokens = _intersect(budgets), _intersect(tokens)
        if (budgets and not v.budgets) or (tokens and not v.tokens):
            continue  # its options share no budget: this combination has no runs
        variants.append(v)
    if not variants:
        raise ValueError(f"{where}: the sweep has an empty grid: no combination of the [grid] options shares a budget")
    return variants


def _seed_variants(table: dict[str, Any], variants: list[Variant], spec: SweepSpec, where: str) -> list[Variant]:
    """[seeds] NAME = {seeds = [1, 2], budgets = [...]}: variant NAME again with ``train.seed`` = each
    seed, named ``NAME-seedS``, at the given budgets (or tokens; default: all of NAME's). A seed run
    is its twin but for the seed, by construction: a paired comparison across families needs exactly
    that (the same data order per seed), and a copied table of overrides could drift from its twin."""
    by_name = {v.name: v for v in variants}
    out = []
    for name, entry in table.items():
        what = f"[seeds] {name}"
        if name not in by_name:
            from torchpeer.lm.config_names import closest

            close = closest(name, list(by_name))
            raise ValueError(
                f"{where}: {what}: no variant is named {name!r}; [seeds] names a [variants] or [grid] variant"
                + (f"; did you mean {close}?" if close else "")
            )
        entry = _table(entry, what, where)
        seeds, unknown = entry.get("seeds"), sorted(set(entry) - {"seeds", "budgets", "tokens"})
        whole = isinstance(seeds, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
        if unknown or not whole or not seeds or min(seeds) < 0:
            raise ValueError(
                f"{where}: {what} = {entry!r}: give seeds = a non-empty list of whole numbers >= 0 (e.g. [1, 2]) "
                "and optionally budgets or tokens" + (f"; unknown key(s) {unknown}" if unknown else "")
            )
        twin = by_name[name]
        own = twin.overrides.get("train.seed", spec.base_overrides.get("train.seed"))
        repeated = sorted({x for x in seeds if seeds.count(x) > 1 or x == own})
        if repeated:
            raise ValueError(f"{where}: {what}: seed(s) {repeated} repeat {name}'s own seed or each other")
        budgets, tokens = _budgets(entry, what, where)
        for given, allowed, key in (
            (budgets, twin.budgets or spec.budgets, "budgets"),
            (tokens, twin.tokens or spec.tokens, "tokens"),
        ):
            extra = [x for x in given if x not in (allowed or [])]
            if extra:
                raise ValueError(
                    f"{where}: {what}: {key} {extra} are not among {name}'s ({allowed or 'none'}); "
                    "a seed run repeats runs of its variant"
                )
        budgets, tokens = budgets or (None if tokens else twin.budgets), tokens or (None if budgets else twin.tokens)
        out += [
            dataclasses.replace(
                twin,
                name=f"{name}-seed{s}",
                overrides={**twin.overrides, "train.seed": s},
                budgets=budgets,
                tokens=tokens,
            )
            for s in seeds
        ]
    return out


def _first_value(key: str, value: Any) -> tuple[str, Any]:
    return key, value[0] if isinstance(value, list) and value else value


def _intersect(lists: list[list]) -> list | None:
    """Budgets common to every option that names some (None = no option names any; [] = none common)."""
    if not lists:
        return None
    return [b for b in lists[0] if all(b in other for other in lists[1:])]


def _value_name(v: Any) -> str:
    text = str(v).lower() if isinstance(v, bool) else str(v)
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


# ----------------------------------------------------------------------------- field checks


def _overrides(table: dict[str, Any], what: str, where: str, meta=VARIANT_META_KEYS) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        if key in meta:
            continue
        if "." not in key and isinstance(value, dict) and (found := unquoted_field(key, value)):
            raise ValueError(unquoted_message(found, what, where))
        if "." not in key:
            allowed = f"meta keys {list(meta)} or " if meta else ""
            raise ValueError(
                f"{where}: unknown field {key!r} in {what}; use {allowed}dotted config fields such as "
                "'model.d_model' or 'train.lr'"
            )
        if isinstance(value, dict):
            example = "; ".join(f'"{key}.{k}" = {json.dumps(v)}' for k, v in list(value.items())[:2])
            drop = ' ("data.valid.NAME" = "none" drops an eval set of the base config)' if key == "data.valid" else ""
            raise ValueError(
                f"{where}: {what} {key} is a table; give one value per dotted field"
                + (f", e.g. {example}" if example else "")
                + drop
            )
        check_field(key, value, what, where)
        out[key] = value
    return out


def _budgets(table: dict[str, Any], what: str, where: str) -> tuple[list[float], list[int]]:
    budgets, tokens = table.get("budgets", []), table.get("tokens", [])
    for key, values in (("budgets", budgets), ("tokens", tokens)):
        if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values
        ):
            raise ValueError(f"{where}: {what} {key} must be a list of positive numbers, got {values!r}")
        if key in table and not values:
            raise ValueError(f"{where}: the sweep has an empty grid: {what} {key} = [] lists nothing")
    return [float(b) for b in budgets], [int(t) for t in tokens]


def _positive(sweep: dict[str, Any], key: str, where: str) -> float | None:
    """A positive finite number of [sweep] (None when absent); one error naming what to give."""
    value = sweep.get(key)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf")
    ):
        raise ValueError(f"{where}: sweep.{key} = {value!r}: give {SWEEP_KEYS[key]} (or leave it out)")
    return None if value is None else float(value)


def _table(value: Any, what: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: {what} must be a table, got {value!r}")
    return value


def _str(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: {what} must be a string, got {value!r}")
    return value


def _check_name(name: str, what: str, where: str) -> None:
    if not NAME_RE.match(name):
        raise ValueError(f"{where}: {what} = {name!r}: use letters, digits and _ . = + - (it names folders)")
