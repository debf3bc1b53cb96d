"""Running a sweep: plan, then train each run with ``torchpeer.lm.train``, resumably.

Per run (folder RUNS_DIR/<variant>-<budget>, the trainer's run folder):

* recorded in results.jsonl           -> skipped (its config must still match the spec's);
* summary.json but not recorded       -> recorded from the summary (killed after training);
* checkpoints                         -> resumed from the latest (the trainer's exact resume);
* otherwise                           -> trained from scratch (a partial log is dropped).

So the same command can be repeated until the sweep is complete, e.g. across GPU jobs of
limited length (``time_limit`` stops before starting a run that would not finish in time).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable

from torchpeer.experiments.plan import PlannedRun, plan_sweep, select_runs
from torchpeer.experiments.pool import finished_message, not_started_message, run_parallel, too_long_message
from torchpeer.experiments.results import (
    append_result,
    breaks_epoch_rule,
    data_key,
    epoch_fields,
    epochs_cell,
    epochs_text,
    make_run_record,
    read_results,
    relabel,
    replace_results,
    short_count,
)
from torchpeer.experiments.spec import SweepSpec
from torchpeer.lm.checkpoint import checkpoint_dir, latest_checkpoint_step, list_checkpoints

# Config fields that do not change what a run computes: a finished run is still valid if they differ.
_NON_RESULT_FIELDS = (
    "model.vocab_size",
    "train.device",
    "train.log_interval",
    "train.eval_interval",
    "train.ckpt_interval",
    "train.keep_checkpoints",
    "train.checkpoint",
    "train.tensorboard",
    "train.compile",
    "data.cache_dir",
)


def run_sweep(
    spec: SweepSpec,
    runs_dir: str,
    only: str | None = None,
    dry_run: bool = False,
    progress: bool = True,
    assume_tokens_per_s: float | None = None,
    time_limit: float | None = None,
    say: Callable[[str], None] = print,
    parallel: int = 1,
    stop_at: float | None = None,
    drop_checkpoints: bool = False,
    longest_first: bool = False,
) -> list[dict]:
    """Train the runs of ``spec`` not yet in ``runs_dir``; returns the records of this invocation.

    parallel: runs trained at once, each in a worker process (pool.py); 1 = one after another in
    this process, unless stop_at is given. stop_at: seconds after the start at which runs still
    training are interrupted (they resume or restart next time), for jobs with a hard end; it
    needs a worker process to interrupt, so with parallel 1 the single run goes to one worker. drop_checkpoints:
    delete a run's checkpoints once its result is recorded (they only serve resuming; a 1M-expert
    model's are GBs). longest_first: worker runs start by estimate, longest first (pool.run_parallel).
    """
    if parallel < 1:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    if stop_at is not None and stop_at <= 0:
        raise ValueError(f"--stop-at must be > 0 seconds, got {stop_at}")
    if time_limit is not None and time_limit < 0:  # (0 starts nothing, as a job with no time left would)
        raise ValueError(f"--time-limit must be >= 0 seconds, got {time_limit}")
    if assume_tokens_per_s is not None and not assume_tokens_per_s > 0:  # else negative or no estimates
        raise ValueError(f"--assume-tokens-per-s must be > 0, got {assume_tokens_per_s}")
    runs = select_runs(plan_sweep(spec, runs_dir), only)
    done = {r["run"]: r for r in read_results(runs_dir)}
    # A run (partly) trained with another config than the spec now gives is refused before anything
    # trains, by the dry run too (its plan would call the run done or partial, and resuming one with
    # another model fails in the trainer with advice for `torchpeer train`).
    check_unchanged([run for run in runs if run.name in done or _has_trained(run)], runs_dir)
    if dry_run:
        say(format_plan(spec, runs, list(done.values()), assume_tokens_per_s))
        say(build_check_report([r for r in runs if r.name not in done]))
        return []
    os.makedirs(runs_dir, exist_ok=True)
    t0, new, todo, relabelled = time.time(), [], [], []
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.name}"
        if run.name in done:
            changed = relabel(done[run.name], run, spec)  # the spec's kind, x, family, ... edited since
            relabelled += [done[run.name]] if changed else []
            note = f"; its results line takes the spec's {', '.join(changed)}" if changed else ""
            say(f"{head}: done, skipped{note}")
            continue
        summary_path = os.path.join(run.run_dir, "summary.json")
        if os.path.exists(summary_path):
            with open(summary_path, encoding="utf-8") as fh:
                rec = make_run_record(run, json.load(fh), spec)
            append_result(runs_dir, rec)
            new.append(rec)
            say(f"{head}: finished earlier, recorded from its summary")
            continue
        todo.append((head, run))
    if relabelled:
        replace_results(runs_dir, relabelled)
    # Worker processes when several runs share the GPU, or when a run must be interruptible at
    # stop_at (this process cannot SIGINT itself and go on to record what finished).
    if (parallel > 1 or stop_at is not None) and todo:
        from torchpeer.experiments.data_prep import prepare_data

        t_data = time.time()
        for data_cfg in _distinct_data_configs([run for _, run in todo]):
            n = prepare_data(data_cfg, progress=progress)
            say(f"data ready: {data_cfg.train} ({n:,} train tokens), {len(data_cfg.valid)} eval sets")
        say(f"data prepared in {time.time() - t_data:.0f} s; {len(todo)} runs, {parallel} at a time")

        def estimate(run):
            return estimate_seconds(run, list(done.values()) + new, assume_tokens_per_s)

        left = None if time_limit is None else time_limit - (time.time() - t0)
        stop = None if stop_at is None else stop_at - (time.time() - t0)
        return new + run_parallel(
            spec,
            todo,
            runs_dir,
            parallel,
            estimate,
            left,
            stop,
            say,
            on_recorded=drop_run_checkpoints if drop_checkpoints else None,
            memory=step_memory_bytes,
            longest_first=longest_first,
        )
    for k, (head, run) in enumerate(todo):
        estimate = estimate_seconds(run, list(done.values()) + new, assume_tokens_per_s)
        if time_limit is not None and estimate is not None and estimate > time_limit:
            say(too_long_message(head, run, estimate))
            continue
        why = None
        if time_limit is not None and estimate is not None and time.time() - t0 + estimate > time_limit:
            why = f"its estimated {estimate:.0f} s would pass the time limit of {time_limit:.0f} s"
        elif time_limit is not None and time.time() - t0 >= time_limit:
            why = f"the time limit of {time_limit:.0f} s is reached"
        if why:  # and what is left, as the parallel path says it: the sweep is not done
            say(f"{head}: stopping, {why}")
            say(not_started_message([r.name for _, r in todo[k:]]))
            break
        ckpts = list_checkpoints(run.run_dir)
        state = f"resuming from {os.path.basename(ckpts[-1])}" if ckpts else "starting"
        say(f"{head}: {state}: {run.family}, {run.tokens:,} tokens in {run.steps} steps, {run.train_flops:.3g} FLOPs")
        rec = train_run(run, spec, progress)
        append_result(runs_dir, rec)
        new.append(rec)
        if drop_checkpoints:
            drop_run_checkpoints(run)
        say(finished_message(head, rec))
    return new


def drop_run_checkpoints(run: PlannedRun) -> None:
    """Delete RUN_DIR/checkpoints of a recorded run (its summary and log stay)."""
    import shutil

    shutil.rmtree(checkpoint_dir(run.run_dir), ignore_errors=True)


def _distinct_data_configs(runs: list[PlannedRun]) -> list:
    seen, out = set(), []
    for run in runs:
        key = data_key(run.cfg.data)
        if key not in seen:
            seen.add(key)
            out.append(run.cfg.data)
    return out


def train_run(run: PlannedRun, spec: SweepSpec, progress: bool = True) -> dict:
    """Train one planned run (resuming it when it has checkpoints) and return its results record."""
    import copy

    from torchpeer.lm import train

    t0 = time.time()
    summary = train(copy.deepcopy(run.cfg), run.run_dir, resume=True, progress=progress)
    return make_run_record(run, summary, spec, wall_seconds=time.time() - t0)


def check_unchanged(runs: list[PlannedRun], runs_dir: str) -> None:
    """One ValueError naming every run whose folder was trained with another config than the spec
    now gives (a field changed in [base] changes them all: one error, not one per deleted folder)."""
    changed = [(run, diffs) for run in runs if (diffs := config_changes(run))]
    if not changed:
        return
    run, diffs = changed[0]
    if len(changed) == 1:
        raise ValueError(
            f"run {run.name} in {run.run_dir} was trained with another config ({'; '.join(diffs)}); "
            "delete that folder (and its line in results.jsonl) to retrain it, or rename the variant"
        )
    names = ", ".join(r.name for r, _ in changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    same = all(d == diffs for _, d in changed)
    raise ValueError(
        f"{len(changed)} runs in {runs_dir} were trained with another config ({'; '.join(diffs)}"
        f"{'' if same else f' in {run.name}; other fields in others'}): {names}; give the changed spec a new "
        "--runs-dir, or delete those folders (and their lines in results.jsonl) to retrain them"
    )


def config_changes(run: PlannedRun) -> list[str]:
    """The fields (``"train.lr: was 0.002, now 0.5"``) in which the config saved in ``run``'s folder
    differs from the spec's; [] when none differ or the folder has no config."""
    path = os.path.join(run.run_dir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    # only the config sections: the trainer adds records of its own (e.g. the resolved kernel backends)
    saved = _flat({k: saved.get(k, {}) for k in ("model", "train", "data")})
    now = _flat({k: v for k, v in run.cfg.to_dict().items() if k in ("model", "train", "data")})
    # A field the saved config lacks was added to the code after the run trained: the run had its
    # behaviour before the field existed, which is the field's default (new fields default to it).
    from torchpeer.lm import RunConfig

    defaults = _flat({k: v for k, v in RunConfig().to_dict().items() if k in ("model", "train", "data")})
    return [
        f"{k}: was {saved.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
        and not k.startswith(_NON_RESULT_FIELDS)
        and not (k not in saved and k in defaults and now.get(k) == defaults[k])
    ]


def _has_trained(run: PlannedRun) -> bool:
    """Whether ``run``'s folder holds training of it: a summary (finished) or checkpoints (interrupted,
    to resume). A folder with neither is trained from scratch, whatever config it saved."""
    return os.path.exists(os.path.join(run.run_dir, "summary.json")) or bool(list_checkpoints(run.run_dir))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix == "data." and k == "valid"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------- dry run


def estimate_seconds(run: PlannedRun, records: list[dict], assume_tokens_per_s: float | None = None) -> float | None:
    """Training + overhead seconds (None: unknown); ``estimate_basis`` says what they rest on."""
    return estimate_basis(run, records, assume_tokens_per_s)[0]


def estimate_basis(
    run: PlannedRun, records: list[dict], assume_tokens_per_s: float | None = None
) -> tuple[float | None, str | None]:
    """(seconds, basis): from the measured tokens/s of the same variant, else of a run of the same
    family and size (e.g. another seed): "measured"; else from the FLOP rate (tokens/s x FLOPs a
    token) of the family's run nearest in FLOPs a token: "family" (0.4-2.7x, median ~1, on isoflop-lrw's;
    "unknown" would start a run whatever the time limit: campaign.md Batch 23); else, for a new family,
    of the nearest run of the same FFW kind (e.g. a PEER router variant from PEER's runs): "kind"; else
    from ``assume_tokens_per_s``: "assumed"; else (None, None). A resumed run counts the steps it has left."""
    same = [r for r in records if r.get("variant") == run.variant and r.get("tokens_per_s")]
    if not same:  # another variant of the same model (e.g. another seed): same family and size
        same = [
            r
            for r in records
            if r.get("family") == run.family and r.get("total_params") == run.total_params and r.get("tokens_per_s")
        ]
    left = 1.0 - _done_fraction(run)  # a resumed run only has its rest to train
    if same:
        rec, basis = same[-1], "measured"
        seconds = run.tokens * left / rec["tokens_per_s"]
    else:
        rated = [r for r in records if r.get("tokens_per_s") and r.get("train_flops_per_token")]
        tiers = (("family", "family", run.family), ("kind", "ffw", run.cfg.model.ffw))
        kins = ((b, [r for r in rated if r.get(k) == v]) for b, k, v in tiers)
        basis, kin = next(((b, kin) for b, kin in kins if kin), (None, []))
        if not kin:
            return (run.tokens * left / assume_tokens_per_s, "assumed") if assume_tokens_per_s else (None, None)
        rec = min(kin, key=lambda r: abs(math.log(r["train_flops_per_token"] / run.train_flops_per_token)))
        seconds = run.train_flops * left / (rec["tokens_per_s"] * rec["train_flops_per_token"])
    overhead = max(0.0, (rec.get("wall_seconds") or 0.0) - (rec.get("train_seconds") or 0.0))
    return seconds + overhead, basis


def _done_fraction(run: PlannedRun) -> float:
    """The share of ``run``'s steps its newest checkpoint holds (0 without one), from the folder name
    step_<n>, so that a run interrupted at the end of one job is estimated by what is left of it."""
    step = latest_checkpoint_step(run.run_dir)
    if not step or run.steps <= 0:
        return 0.0
    return min(1.0, max(0.0, step / run.steps))


def build_check_report(runs: list[PlannedRun]) -> str:
    """The dry run's last line: every run to train built on the meta device (model, table optimizer,
    AdamW groups); a ValueError naming each run whose build fails, so no GPU time goes to it."""
    from torchpeer.experiments.build_check import check_builds

    failures = check_builds(runs)
    if failures:
        each = "; ".join(f"{name}: {err}" for name, err in failures)
        raise ValueError(f"{len(failures)} of the {len(runs)} runs to train would fail at build (fix the spec): {each}")
    return f"build check passed: {len(runs)} run(s) to train built (model, table optimizer, AdamW groups; meta device)"


def format_plan(
    spec: SweepSpec, runs: list[PlannedRun], records: list[dict], assume_tokens_per_s: float | None = None
) -> str:
    """The --dry-run table: every run with its size, tokens, FLOPs and an estimated time
    (measured tokens/s of the variant; else ``assume_tokens_per_s``, marked '~'; else unknown).
    With a data rule (``spec.max_epochs``) a run with more epochs is marked '> N' in the epochs
    column and named under the table: it still trains, but the report leaves it out of the fits."""
    done = {r["run"] for r in records}
    header = ("run", "family", "params", "active", "FLOPs/token", "steps", "tokens", "epochs", "FLOPs", "GiB")
    header += ("est. time",)
    rows = [(*header, "state")]
    total, unknown = 0.0, 0
    memo: dict = {}
    epochs = {run.name: epoch_fields(run, memo)["epochs"] for run in runs}
    rule = spec.max_epochs
    over = [run.name for run in runs if breaks_epoch_rule(epochs[run.name], rule)]
    for run in runs:
        est, basis = (None, None) if run.name in done else estimate_basis(run, records, assume_tokens_per_s)
        guessed = basis in ("family", "kind", "assumed")
        if run.name not in done:
            if est is None:
                unknown += 1
            else:
                total += est
        rows.append(
            (
                run.name,
                run.family,
                short_count(run.total_params),
                short_count(run.active_params),
                f"{run.train_flops_per_token:.3g}",
                f"{run.steps:,}",
                f"{run.tokens:,}",
                _epochs_cell(epochs[run.name], rule),
                f"{run.train_flops:.3g}",
                _memory_cell(run),
                "-" if run.name in done else ("unknown" if est is None else ("~" if guessed else "") + _duration(est)),
                "done" if run.name in done else ("partial" if list_checkpoints(run.run_dir) else "todo"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"sweep {spec.name} ({spec.kind}): {len(runs)} runs, base config {spec.base}"]
    if spec.description:
        lines.append(spec.description.strip())
    for j, r in enumerate(rows):
        cells = (c.ljust(w) if i in (0, 1, 11) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    todo = sum(1 for r in runs if r.name not in done)
    basis = "measured tokens/s (~: a new size or family, from the FLOP rate of its family's or FFW kind's nearest run)"
    if assume_tokens_per_s:
        basis += f", else an assumed {assume_tokens_per_s:,.0f} tokens/s (~)"
    hint = "" if assume_tokens_per_s else "; --assume-tokens-per-s N estimates them"
    tail = f", {unknown} unknown (no measured tokens/s yet{hint})" if unknown else ""
    if unknown and unknown == todo:  # no run has an estimate: "estimated 0 s" would read as one
        lines.append(f"{todo} runs to train; no time estimate yet (no measured tokens/s{hint})")
    else:
        lines.append(f"{todo} runs to train; estimated {_duration(total)} from {basis}{tail}")
    shares = [r["sharing"] for r in records if isinstance(r.get("sharing"), (int, float))]
    if shares and todo:  # a rate measured 8-way is not a run alone's: the 1e16 plan misread it (campaign.md)
        lines.append(
            f"measured tokens/s are each run's share of its GPU: {min(shares):g}-{max(shares):g} runs trained on "
            "it at once on average (results' 'sharing'); at another --parallel the times differ"
        )
    lines.append(
        "GiB: a run's estimated peak memory on a CUDA GPU (torchpeer.lm.memory; the CPU's for train.device cpu); "
        "with --parallel N, runs start side by side while their estimates fit the GPU's free memory, the rest "
        "wait for one to end"
    )
    if any(e is None for e in epochs.values()):
        # not 'torchpeer data --config BASE': the spec's data overrides (tokenizer, sources) are not the base's
        lines.append("epochs '?': the train split is not tokenised yet; the sweep's first run tokenises it")
    if rule is not None:
        lines.append(_rule_line(rule, epochs, over))
    return "\n".join(line.rstrip() for line in lines)


def step_memory_bytes(run: PlannedRun) -> int | None:
    """Bytes of one training step on a CUDA GPU (a CPU run's own memory for train.device = "cpu");
    None when unknown (e.g. a tokenizer folder not there yet: the vocabulary is unknown)."""
    from torchpeer.lm.memory import estimate_step_memory

    device = "cpu" if run.cfg.train.device == "cpu" else "cuda"
    try:
        return estimate_step_memory(run.cfg, device).total
    except (ValueError, OSError):
        return None


def _memory_cell(run: PlannedRun) -> str:
    nbytes = step_memory_bytes(run)
    return "?" if nbytes is None else f"{nbytes / 2**30:.1f}"


def _epochs_cell(epochs: float | None, rule: float | None) -> str:
    if epochs is None:
        return "?"
    return epochs_cell(epochs) + (f" > {epochs_text(rule)}" if breaks_epoch_rule(epochs, rule) else "")


def _rule_line(rule: float, epochs: dict[str, float | None], over: list[str]) -> str:
    """The plan's statement of the data rule: which runs break it (they train, the report keeps
    them out of the fits), or that none does, or that it cannot be checked yet."""
    n = epochs_text(rule)
    head = f"data rule max_epochs = {n}: "
    if all(e is None for e in epochs.values()):
        return head + "not checked: the train split is not tokenised yet (epochs '?')"
    if over:
        text = head + (
            f"{len(over)} run{' repeats' if len(over) == 1 else 's repeat'} the train split more than {n} times "
            f"(marked '> {n}'; they train, the report draws them outside the fits): {', '.join(over)}"
        )
    else:
        text = head + f"no run repeats the train split more than {n} times"
    if any(e is None for e in epochs.values()):
        text += "; runs with epochs '?' are not checked until the train split is tokenised"
    return text


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
