"""Stopping a run on SIGINT/SIGTERM: finish the current step, checkpoint, then raise.

While ``Trainer.fit`` runs, the first SIGINT (Ctrl-C) or SIGTERM only sets a flag; the loop checks
it after each step, writes a checkpoint of that step (when checkpoints are on) and raises
TrainingInterrupted, which the CLI turns into "resume with: ..." and exit status 128 + signal
(130 / 143). A second signal stops at once (KeyboardInterrupt). While the run is still being built
(tokenizer training, tokenising) or in its final evaluation (after the final checkpoint) a signal
stops at once with TrainingInterrupted (there is nothing new to checkpoint; the latest checkpoint is
named for the resume command, which evaluates again).
"""

from __future__ import annotations

import os
import signal
import threading


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after step ``step``; ``checkpoint`` is the folder written
    on the way out (None when checkpoints are off)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class StopOnSignals:
    """While training, SIGINT/SIGTERM ask the trainer to stop after the current step; a second
    signal stops at once (KeyboardInterrupt). Only the main thread can own signal handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, trainer):
        self.trainer, self.previous = trainer, {}

    def _handle(self, signum, frame) -> None:
        if self.trainer.signal_received is not None:
            raise KeyboardInterrupt
        if not self.trainer.in_loop:  # building, or the final evaluation: nothing new to save, stop now
            from torchpeer.lm.checkpoint import latest_checkpoint

            raise TrainingInterrupted(signum, self.trainer.step, latest_checkpoint(self.trainer.run_dir))
        self.trainer.signal_received = signum
        plan = getattr(self.trainer, "plan", None)
        if plan is None or plan.is_rank0:  # say so now: a large checkpoint takes seconds, and silence
            # invites the second Ctrl-C that loses it. os.write, not print: the handler may run in the
            # middle of a print to stderr (the progress bar), and a buffered stream refuses re-entry
            msg = (
                f"{signal.Signals(signum).name}: stopping after this step with a checkpoint; a second one stops at once"
            )
            os.write(2, f"\n{msg}, without it\n".encode())

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
