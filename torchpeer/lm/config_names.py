"""Closest-name suggestions for misspelt config keys, config names and spec names.

``closest(name, candidates)``: the candidate most like ``name``, after ``OTHER_NAMES`` (other
libraries' names for fields, which letters alone would match wrongly or not at all).
``misplaced_hint(cls, key, value)``: where a bare top-level ``key`` belongs (``d_model = 64`` above
``[model]``), for the unknown-key error.
"""

from __future__ import annotations

# Other libraries' names for fields that are spelt too differently here for the closest-name match
# (``learning_rate`` is not like ``lr``; ``steps`` is nearer ``eps`` than ``max_steps`` by letters):
# name -> the fields' last parts it may mean, in order; one in the same section is preferred
OTHER_NAMES = {
    "learning_rate": "lr",
    "steps": "max_steps",
    "num_steps": "max_steps",
    "train_steps": "max_steps",
    "total_steps": "max_steps",
    "tokens": "max_tokens",
    "hidden_size": "d_model",
    "n_embd": "d_model",
    "dim": "d_model",
    "block_size": "seq_len",
    "max_seq_len": "seq_len",
    "context_length": "seq_len",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "clip_grad_norm": "grad_clip",
    "max_grad_norm": "grad_clip",
    "warmup": "warmup_steps",
    # letters alone gave a wrong field: checkpoint_every -> checkpoint (the on/off switch), save_steps
    # and eval_steps -> max_steps, save_interval -> eval_interval, eval_iters (nanoGPT's eval batches)
    # -> eval_interval; and nothing for log_every, logging_steps, wd, precision
    "checkpoint_every": "ckpt_interval",
    "save_every": "ckpt_interval",
    "save_interval": "ckpt_interval",
    "save_steps": "ckpt_interval",
    "eval_steps": "eval_interval",
    "eval_iters": "eval_batches",
    "log_every": "log_interval",
    "logging_steps": "log_interval",
    "wd": "weight_decay",
    "precision": "dtype",
    "bf16": "dtype",
    "amp": "dtype",
    "key_dim": "d_key",  # not key_init
    "num_attention_heads": "n_heads",
    "intermediate_size": "d_hidden",
    "ffn_dim": "d_hidden",
    "num_experts": "n_experts",
    "num_heads": "n_heads heads",
    "n_heads": "heads",
    "topk": "top_k",
    "k": "top_k",
}


def closest(name: str, candidates) -> str | None:
    """The candidate most like ``name`` (a misspelt key: ``max_step`` -> ``max_steps``; another
    library's name: ``learning_rate`` -> ``lr``), or None."""
    import difflib

    candidates = list(candidates)
    for meant in OTHER_NAMES.get(name, "").split():
        if meant in candidates:
            return meant
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def _tables(cls, prefix: str = "") -> dict[str, set[str]]:
    """{table: its field names} of every table under dataclass ``cls`` ("model", "model.peer", "train", ...)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(tp := hints[f.name]):
            out[prefix + f.name] = {g.name for g in dataclasses.fields(tp)}
            out.update(_tables(tp, f"{prefix}{f.name}."))
    return out


def misplaced_hint(cls, key: str, value, here: str | None = None) -> str | None:
    """For a key at the top level of a ``cls`` (RunConfig) dict that is a field of one of its tables:
    "'d_model' is a field of [model]: move the line d_model = 64 under [model]" ("name its table
    [model.peer]" for a table [peer]); several tables are all named; None when no table has the field.
    here: the table the key was found in instead ("model" for ``lr = 3e-3`` under [model]): "'lr' is a
    field of [train], not [model]: move the line ..."; the other tables only."""
    import json

    tables = _tables(cls)
    if here is not None:
        if isinstance(value, dict):
            return None
        tables = {t: fields for t, fields in tables.items() if t != here}
    if isinstance(value, dict):  # [peer] at the top: a section of [model]
        parents = [t for t in tables if f"{t}.{key}" in tables]
        names = " or ".join(f"[{t}.{key}]" for t in parents)
        return (
            f"{key!r} is a section of {' and '.join(f'[{t}]' for t in parents)}: name its table {names}"
            if parents
            else None
        )
    owners = [t for t, fields in tables.items() if key in fields]
    if not owners:
        return None
    text = ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)
    where = f"[{owners[0]}]" if len(owners) == 1 else "the one meant"
    not_here = f", not [{here}]" if here is not None else ""
    tables_named = " and ".join(f"[{t}]" for t in owners)
    return f"{key!r} is a field of {tables_named}{not_here}: move the line {key} = {text} under {where}"
