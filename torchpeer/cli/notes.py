"""Notes about a config and the overrides given to it, printed by ``torchpeer train`` at its start
and by ``torchpeer info``: settings that would otherwise do nothing, or less than asked, without a word."""

from __future__ import annotations

import dataclasses


def infer_vocab_size(cfg) -> int:
    """model.vocab_size, or the tokenizer's (bpe: the configured target size) without training one."""
    from torchpeer.data import expected_vocab_size

    return cfg.model.vocab_size if cfg.model.vocab_size is not None else expected_vocab_size(cfg.data)


def preempted_budget_note(cfg, overrides) -> str | None:
    """The note when a budget given on the command line (--train.max_tokens 2e6) is never reached
    because a budget field of the config stops the run first (ptb-tiny's max_steps = 500): the run
    would stop early without a word (the progress bar's total is the only sign)."""
    from torchpeer.lm.budget import BUDGET_FIELDS, preempted_note

    given = {k for k, v in overrides if k in BUDGET_FIELDS and str(v).strip().lower() not in ("none", "null")}
    if not given:
        return None
    flops = None
    if cfg.train.max_flops is not None:  # the model's training FLOPs per token, as torchpeer info counts them
        from torchpeer.lm.info import config_cost

        model = dataclasses.replace(cfg.model, vocab_size=infer_vocab_size(cfg))
        flops = config_cost(model).train_flops
    return preempted_note(cfg, flops, given)


def unused_section_note(cfg, overrides) -> str | None:
    """The note when an override sets a field of another FFW kind's section than the model's
    (--model.ffw pkm --model.peer.top_k 4): the model never reads it, and nothing said so. [model.dense]
    is always read (the blocks without the sparse FFW are dense)."""
    from torchpeer.layers import ffw_kinds

    ffw = cfg.model.ffw
    unused = [
        k for k, _ in overrides if k.split(".")[0] == "model" and k.split(".")[1] in set(ffw_kinds()) - {ffw, "dense"}
    ]
    if not unused:
        return None
    ours = {f"model.{ffw}.{f.name}" for f in dataclasses.fields(getattr(cfg.model, ffw))}
    meant = [f"model.{ffw}.{k.split('.', 2)[2]}" for k in unused]
    hint = [m for m in meant if m in ours]
    sections = "[model.dense]" if ffw == "dense" else f"[model.{ffw}] (and [model.dense])"
    return (
        f"note: {', '.join('--' + k for k in unused)} {'does' if len(unused) == 1 else 'do'} nothing: "
        f"model.ffw = {ffw!r} reads only {sections}"
        + (f"; did you mean {', '.join('--' + m for m in hint)}?" if hint else "")
    )
