"""What a training run prints besides its log lines: the lines at its start and the periodic
evaluation line, and what a resume of a finished run prints (its line is finished.py's)."""

from __future__ import annotations

import os

from torchpeer.lm.budget import warmup_note


def resume_lines(trainer) -> list[str]:
    """What a resume found: its notes (damaged checkpoints moved aside, ...) and the partial
    checkpoints it removed."""
    lines = list(trainer.notes)
    if trainer.removed_partials:
        lines.append(f"removed {len(trainer.removed_partials)} partial checkpoint(s) left by an interrupted save")
    return lines


def say_finished(trainer) -> None:
    """What a resume of a finished run prints (rank 0): what the resume found, then one line."""
    from torchpeer.lm.finished import finished_message

    t = trainer
    line = finished_message(t.run_dir, t.step, t.total_steps, t.budget_setting, t.cfg)
    if t.plan.is_rank0:
        print("\n".join([*resume_lines(t), line]))


def start_lines(trainer) -> list[str]:
    """The lines a (rank-0) Trainer prints before its first step: resume_lines, where it resumes from
    and what changed, a warmup longer than the run, a non-causal FFW, the op backends, a missing TensorBoard."""
    t = trainer
    lines = resume_lines(t)
    if t.ckpt is not None:
        lines.append(
            f"resuming {t.run_dir} from {os.path.basename(t.ckpt)}: step {t.step}/{t.total_steps}, "
            f"{t.step * t.tokens_per_step:,} tokens"
        )
        if t.config_changes:
            lines.append(f"changed on resume (kept in {t.run_dir}/configs/): {'; '.join(t.config_changes)}")
    warmup = warmup_note(t.cfg, t.total_steps)
    if warmup and t.step == 0:  # (a resumed run said so when it started)
        lines.append(warmup)
    noncausal = noncausal_note(t.cfg)
    if noncausal and t.step == 0:
        lines.append(noncausal)
    if t.progress and t.backends:
        lines.append(f"op backends: {format_backends(t.backends)}")
    if t.log.tb_missing:
        lines.append(t.log.tb_missing)
    return lines


def noncausal_note(cfg) -> str | None:
    """A note when the LM's FFW is expert-choice MoE (the default routing of ``model.ffw = "moe"``, the
    paper's baseline): experts pick tokens among all of a batch's positions, so a token's output
    depends on later tokens, in training and in evaluation, and the perplexity is not a causal LM's."""
    if cfg.model.ffw != "moe" or cfg.model.moe.routing != "expert_choice":
        return None
    return (
        'note: model.moe.routing = "expert_choice" is not causal (experts choose among all positions of a batch, '
        "so a token's output depends on later tokens): its perplexities are not comparable with a causal model's; "
        "for a causal MoE give --model.moe.routing token_choice"
    )


def format_backends(report: dict) -> str:
    """{layer: {op: backend}} -> "product_key_topk=torch expert_mix=torch (blocks.1.ffw)", layers with
    the same choices listed together."""
    groups: dict[str, list[str]] = {}
    for layer, ops in report.items():
        groups.setdefault(" ".join(f"{op}={b}" for op, b in ops.items()), []).append(layer)
    return "; ".join(f"{choice} ({', '.join(layers)})" for choice, layers in groups.items())


def format_eval(results: dict) -> str:
    """{set: results} -> "corpus loss 3.1234 ppl 22.75 bpb 1.1000, ..." (one periodic evaluation)."""
    return ", ".join(f"{n} loss {r['loss']:.4f} ppl {r['ppl']:.2f} bpb {r['bpb']:.4f}" for n, r in results.items())
