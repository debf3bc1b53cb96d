"""Planning: a SweepSpec -> one resolved, validated run config per (variant, budget).

Budgets stop a run by training FLOPs (``train.max_flops``, the accounting of ``torchpeer info``),
token counts by ``train.max_tokens``; the base config's other stopping fields are cleared. The
steps and tokens of a run are known here, before anything trains:

    steps = floor(budget / (train FLOPs per token * tokens per step))     (budget runs)
    steps = ceil(tokens / tokens per step)                                (token runs)

Everything that can be wrong with a spec (a bad override, a budget below one step) raises here,
so a sweep fails before its first run rather than in its tenth.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from torchpeer.experiments.spec import SweepSpec, Variant
from torchpeer.experiments.spec_fields import override_text


@dataclass
class PlannedRun:
    """One run of a sweep; ``cfg`` is a validated ``torchpeer.lm.RunConfig``."""

    name: str
    variant: str
    family: str
    cfg: Any
    run_dir: str
    budget_flops: float | None
    token_budget: int | None
    train_flops_per_token: int
    tokens_per_step: int
    steps: int
    total_params: int
    active_params: int
    overrides: dict[str, str] = field(default_factory=dict)
    x: float | None = None
    series: str | None = None

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def train_flops(self) -> float:
        return float(self.tokens) * self.train_flops_per_token


def budget_label(value: float) -> str:
    """1e15 -> '1e15', 3e15 -> '3e15', 2.5e6 -> '2.5e6' (folder-name friendly)."""
    exp = int(math.floor(math.log10(value)))
    mant = value / 10**exp
    text = f"{mant:.3g}"
    return f"{text}e{exp}"


def _scale_lrs_by_width(cfg, ref: float, power: float, overrides: dict[str, str]) -> None:
    """The spec's lrs are given at d_model ``ref``: scale train.lr and the tables' lrs (expert_lr,
    expert_lr_final, when set) by (ref / the run's d_model) ** power, in the config and in its overrides.

    Why: with Adam the best lr falls with the width, so one lr for every size of an isoFLOP curve
    trains the small models far from their best and bends the curve. How fast it falls is measured,
    not assumed (docs/research/campaign.md Batches 17-18): as 1 / width on the CPU proxy at 5.6 %
    warm-up (mostly the warm-up's doing), not at all for dense from d_model 128 to 320 on the GPU
    study; isoflop-lrw uses power 0.5."""
    scale = (ref / cfg.model.d_model) ** power
    t = cfg.train
    for key in ("lr", "expert_lr", "expert_lr_final"):
        value = getattr(t, key)
        if value is not None:
            scaled = float(f"{value * scale:.6g}")  # 4e-3 * 128 / 320 -> 0.0016, not 0.0016000000000000003
            setattr(t, key, scaled)
            overrides[f"train.{key}"] = repr(scaled)


def plan_sweep(spec: SweepSpec, runs_dir: str) -> list[PlannedRun]:
    """All runs of ``spec`` in order: budgets outermost, so a partial sweep has whole budgets."""
    pairs: list[tuple[float | None, int | None, Variant]] = []
    budgets = sorted({b for v in spec.variants for b in (v.budgets or ([] if v.tokens else spec.budgets))})
    tokens = sorted({t for v in spec.variants for t in (v.tokens or ([] if v.budgets else spec.tokens))})
    for b in budgets:
        pairs += [(b, None, v) for v in spec.variants if b in (v.budgets or ([] if v.tokens else spec.budgets))]
    for t in tokens:
        pairs += [(None, t, v) for v in spec.variants if t in (v.tokens or ([] if v.budgets else spec.tokens))]
    return [plan_run(spec, v, b, t, runs_dir) for b, t, v in pairs]


def plan_run(spec: SweepSpec, variant: Variant, budget: float | None, tokens: int | None, runs_dir: str) -> PlannedRun:
    from torchpeer.lm import load_config

    if budget is not None:
        name = f"{variant.name}-{budget_label(budget)}"
    else:
        exact = float(budget_label(tokens)) == tokens
        name = f"{variant.name}-tok{budget_label(tokens) if exact else tokens}"
    overrides = {k: override_text(v) for k, v in {**spec.base_overrides, **variant.overrides}.items()}
    stop = {"train.max_steps": "none", "train.max_tokens": "none", "train.max_flops": "none"}
    if budget is not None:
        stop["train.max_flops"] = str(budget)
    else:
        stop["train.max_tokens"] = str(tokens)
    overrides.update(stop)
    where = f"sweep {spec.name!r}, run {name!r}"
    try:
        cfg = load_config(spec.base, [a for k, v in overrides.items() for a in (f"--{k}", v)])
    except FileNotFoundError as e:  # the base itself (every run would say so): name the spec's field
        raise ValueError(f"sweep {spec.name!r}: [sweep] base: {e}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None
    cfg.name = name
    if spec.lr_width_ref is not None:
        power = variant.lr_width_power or spec.lr_width_power  # a variant's own power wins
        _scale_lrs_by_width(cfg, spec.lr_width_ref, power, overrides)
    cost = _cost(cfg, where)
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len
    if budget is not None:
        step_flops = cost.train_flops * tokens_per_step
        steps = int(budget // step_flops)
        if steps < 1:
            raise ValueError(
                f"{where}: budget {budget:.3g} FLOPs is too small for one step ({step_flops:.3g} FLOPs = "
                f"{cost.train_flops:,} FLOPs/token x {tokens_per_step:,} tokens/step); raise the budget or "
                "shrink train.batch_size / model.seq_len"
            )
    else:
        steps = math.ceil(tokens / tokens_per_step)
    # a variant's own warmup_frac or train.warmup_steps wins over the sweep's warmup_frac (a variant
    # cannot set both: spec.py refuses it)
    frac = variant.warmup_frac
    if frac is None and "train.warmup_steps" not in variant.overrides:
        frac = spec.warmup_frac
    if frac is not None:
        t.warmup_steps = int(round(frac * steps))
        overrides["train.warmup_steps"] = str(t.warmup_steps)
    if t.warmup_steps >= steps:
        raise ValueError(
            f"{where}: train.warmup_steps = {t.warmup_steps} is not below the run's {steps} steps; "
            "lower it or set [sweep] warmup_frac"
        )
    if spec.eval_set is not None and spec.eval_set not in cfg.data.valid:
        raise ValueError(
            f"{where}: sweep.eval_set = {spec.eval_set!r} is not one of the run's eval sets "
            f'({", ".join(cfg.data.valid) or "none"}); add it as "data.valid.{spec.eval_set}" in [base]'
        )
    family = variant.family or cfg.model.ffw
    run = PlannedRun(
        name=name,
        variant=variant.name,
        family=family,
        cfg=cfg,
        run_dir=os.path.join(runs_dir, name),
        budget_flops=budget,
        token_budget=tokens,
        train_flops_per_token=cost.train_flops,
        tokens_per_step=tokens_per_step,
        steps=steps,
        total_params=cost.total_params,
        active_params=cost.active_params,
        overrides=overrides,
    )
    if spec.x is not None:
        run.x = field_value(cfg, spec.x, where)
        named = isinstance(run.x, bool) or not isinstance(run.x, (int, float, type(None)))
        if spec.kind == "ablation" and named:  # the report draws loss against x: a name ('ema') failed there
            x = json.dumps(spec.x)
            raise ValueError(
                f"{where}: sweep.x = {x} is {run.x!r} here, not a number; an ablation's x is a numeric field "
                f'(e.g. "model.peer.n_experts"); a field of names is its series: series = {x}'
            )
    if spec.series == "family":  # the variants' own labels (meta key family) name the series
        run.series = family
    elif spec.series is not None:
        run.series = str(field_value(cfg, spec.series, where))
    return run


def _cost(cfg, where: str):
    """Costs of the model on the meta device; the vocabulary is the tokenizer's (estimated for bpe)."""
    try:
        model_cfg = planned_model_config(cfg)
        # the runs of a spec share few model configs (budgets and lrs vary, shapes repeat), and a meta
        # build is ~40 ms: the cost is computed once per distinct config (its repr names every field)
        key = repr(model_cfg)
        if key not in _COSTS:
            from torchpeer.lm import config_cost

            if len(_COSTS) >= 512:
                _COSTS.clear()
            _COSTS[key] = config_cost(model_cfg)
        return copy.deepcopy(_COSTS[key])
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


# {repr of a planned model config: its ModelCost}; a config's repr names every field, nested ones too
_COSTS: dict[str, Any] = {}


def planned_model_config(cfg):
    """A copy of ``cfg.model`` with the vocabulary the trainer will get from the tokenizer (257 for
    bytes, the target for bpe) where it is not set: what the run's model is built from."""
    from torchpeer.data import expected_vocab_size

    model_cfg = copy.deepcopy(cfg.model)
    if model_cfg.vocab_size is None:
        model_cfg.vocab_size = expected_vocab_size(cfg.data, progress=False)
    return model_cfg


def field_value(cfg, expr: str, where: str = "") -> Any:
    """Value of a dotted config field, or the product of several joined by '*'."""
    values = []
    for path in expr.split("*"):
        obj = cfg
        for part in path.strip().split("."):
            if isinstance(obj, dict) and part in obj:
                obj = obj[part]
            elif hasattr(obj, part):
                obj = getattr(obj, part)
            else:
                raise ValueError(f"{where}: {expr!r} names no config field ({path.strip()!r})")
        values.append(obj)
    if len(values) == 1:
        return values[0]
    return math.prod(values)


def select_runs(runs: list[PlannedRun], only: str | None) -> list[PlannedRun]:
    """Runs whose name matches the glob(s) ``only`` (comma-separated); ValueError when none does."""
    if not only:
        return runs
    globs = [g.strip() for g in only.split(",") if g.strip()]
    chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, g) for g in globs)]
    if not chosen:
        raise ValueError(f"--only {only!r} matches no run; runs are: {', '.join(r.name for r in runs)}")
    return chosen
