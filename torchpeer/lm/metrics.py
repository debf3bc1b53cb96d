"""metrics.jsonl: one JSON object per event of a run (+ TensorBoard scalars when available).

Records: {"step": 0, "event": "start", ...} once; {"step", "tokens", "flops", "loss", "lr",
"grad_norm", "tok_per_s", "time"} every log_interval steps; {"step", "eval": {set: results}} after
each evaluation, the last one with "final": true.
"""

from __future__ import annotations

import json
import os

from torchpeer.data.atomic import write_text_atomic
from torchpeer.jsonl import read_json_lines, say_damaged
from torchpeer.lm.rundir import writing


def flatten(d: dict, prefix: str = "") -> dict:
    """{"eval": {"v": {"loss": 1}}} -> {"eval.v.loss": 1}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


class MetricsLog:
    """Appends records to RUN_DIR/metrics.jsonl; on resume it first drops what came after the checkpoint."""

    def __init__(self, run_dir: str, tensorboard: bool, start_step: int):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.truncate_after(start_step)
        self.tb = None
        self.tb_missing: str | None = None  # why TensorBoard events are not written though asked for
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops TensorBoard events a killed run wrote after the checkpoint
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step if start_step > 0 else None)
            except ImportError:  # not installed (the main install has no tensorboard): JSON lines only
                self.tb_missing = (
                    f"tensorboard is not installed: metrics go to {self.path} only (plot them with: torchpeer plot "
                    f"{run_dir}; for TensorBoard: pip install tensorboard, or the [viz] extra; "
                    "--train.tensorboard false silences this)"
                )
            except Exception as e:  # installed but broken (e.g. a protobuf mismatch): JSON lines only
                reason = f"{type(e).__name__}: {e}"
                self.tb_missing = f"tensorboard failed to start ({reason}); metrics go to {self.path} only"

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps <= ``step`` (resume; -1 = none), rewritten atomically.

        The final evaluation record of ``step`` goes too: a resumed run that is already at its
        last step without a recorded final evaluation (stopped during it; an eval set added) evaluates
        again and writes it once more. (One whose final evaluation is recorded never gets here: the
        trainer returns its recorded summary, see Trainer.recorded_finish.)
        """
        if not os.path.exists(self.path):
            return
        lines = read_json_lines(self.path)
        if lines.damaged():  # a cut last line is what the kill left: dropped in silence
            say_damaged(self.path, lines.damaged(), "are not JSON objects and were dropped on resume (a damaged file)")
        keep = [
            json.dumps(rec) + "\n"
            for rec in lines.records
            if rec.get("step", 0) < step or (rec.get("step", 0) == step and not rec.get("final"))
        ]
        with writing(self.path):
            write_text_atomic(self.path, "".join(keep))

    def write(self, rec: dict) -> None:
        with writing(self.path):
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for key, value in flatten(rec).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(key, value, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
