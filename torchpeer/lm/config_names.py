"""Closest-name suggestions for misspelt config keys, config names and spec names.

``closest(name, candidates)``: the candidate most like ``name``, after ``OTHER_NAMES`` (other
libraries' names for fields, which letters alone would match wrongly or not at all).
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
