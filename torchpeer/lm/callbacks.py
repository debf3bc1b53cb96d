"""Training callbacks: how experiment drivers watch (and stop) a run without editing the loop.

Subclass ``Callback`` and override what you need; pass instances as ``train(..., callbacks=[...])``
or ``Trainer(..., callbacks=[...])``. Callbacks run on rank 0 only (see plan.py)::

    class StopWhenDiverged(Callback):
        def on_step_end(self, trainer, step, metrics):
            if "loss" in metrics and not math.isfinite(metrics["loss"]):
                trainer.request_stop("loss diverged")

Order of calls: on_train_start, then per step on_step_end, on_eval after an evaluation (also the
final one), on_checkpoint after a checkpoint is written, and on_train_end with the summary.
"""

from __future__ import annotations


class Callback:
    """No-op base class; every hook receives the Trainer first."""

    def on_train_start(self, trainer) -> None:
        """After build() and before the first step (trainer.step is > 0 on resume)."""

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        """After optimizer step ``step``. metrics always has "step", "tokens" and "lr"; on log
        steps (every train.log_interval) also "loss", "grad_norm", "tok_per_s", "time", "flops",
        and with train.track_usage "routing" (the record written to metrics.jsonl)."""

    def on_eval(self, trainer, step: int, results: dict) -> None:
        """After an evaluation: results = {set name: evaluate() dict}."""

    def on_checkpoint(self, trainer, path: str) -> None:
        """After checkpoint folder ``path`` is complete on disk."""

    def on_train_end(self, trainer, summary: dict) -> None:
        """After summary.json is written (not called when the run fails or is interrupted)."""


class CallbackList(Callback):
    """Calls each callback in order."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks or ())

    def on_train_start(self, trainer) -> None:
        for cb in self.callbacks:
            cb.on_train_start(trainer)

    def on_step_end(self, trainer, step: int, metrics: dict) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, step, metrics)

    def on_eval(self, trainer, step: int, results: dict) -> None:
        for cb in self.callbacks:
            cb.on_eval(trainer, step, results)

    def on_checkpoint(self, trainer, path: str) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(trainer, path)

    def on_train_end(self, trainer, summary: dict) -> None:
        for cb in self.callbacks:
            cb.on_train_end(trainer, summary)
