"""``train(cfg, run_dir)``: one call that builds a Trainer and runs it (see trainer.py).

Run folder layout::

    RUN_DIR/config.json        resolved run config, plus "backends" (the op backend of every layer)
    RUN_DIR/configs/           every config the run was trained under: from_step_<N>.json (resume.py)
    RUN_DIR/metrics.jsonl      one JSON object per log / eval event (metrics.py)
    RUN_DIR/checkpoints/       see checkpoint.py (the newest ``train.keep_checkpoints``)
    RUN_DIR/summary.json       final evaluation and costs
    RUN_DIR/tb/                TensorBoard events (when tensorboard is installed)

Exact resume: a checkpoint holds everything the remaining steps depend on (weights and
BatchNorm buffers, optimizer moments, step, the sampler's position, RNG states), so a run killed
at any point and resumed from its latest checkpoint logs the same losses at the same steps as an
uninterrupted run (bit-exact on the CPU; on CUDA up to nondeterministic kernels). On resume the
metrics records after the checkpoint's step are dropped, so the log reads as one run.
"""

from __future__ import annotations

from torchpeer.lm.budget import plan_steps
from torchpeer.lm.config import RunConfig
from torchpeer.lm.runtime import resolve_device
from torchpeer.lm.trainer import Trainer, TrainingInterrupted

__all__ = ["Trainer", "TrainingInterrupted", "plan_steps", "resolve_device", "train"]


def train(
    cfg: RunConfig, run_dir: str, resume=False, progress=True, callbacks=None, plan=None, init_from=None, parent=None
) -> dict:
    """Train ``cfg`` in ``run_dir``; returns the summary (final evaluation, costs, timing).

    resume: continue from the newest intact checkpoint of run_dir (start fresh if it has none;
    newer damaged ones are moved aside and named), with ``cfg``: changes from the checkpoint's
    config are printed and recorded (``torchpeer train --resume`` passes the saved config). A run
    that had already finished (its final evaluation recorded) is not trained or evaluated again: one
    line says so and how to train further, and its recorded summary is returned.
    Without resume, a run_dir that already holds checkpoints is an error (nothing is touched).
    callbacks: torchpeer.lm.callbacks.Callback instances; plan: a parallel plan (lm/plan.py),
    None = one process (under torchrun pass torchpeer.parallel's, which the core does not import:
    ``torchpeer.parallel.plan.plan_for_this_process()``); init_from: ``fn(model)`` loading
    starting weights into a fresh run's model (every rank, before the plan wraps it); parent: where
    those weights stand in their training ({"step", "tokens", "time"}: plots draw the run after it).
    SIGINT/SIGTERM stop the run after the current step with a checkpoint: TrainingInterrupted.
    """
    seams = {"callbacks": callbacks, "plan": plan, "init_from": init_from, "parent": parent}
    return Trainer(cfg, run_dir, resume, progress, **seams).fit()
