"""One sweep run in its own process: ``python -m torchpeer.experiments.worker RUN_DIR``.

The sweep (pool.py) writes the run's resolved config to ``RUN_DIR/sweep_run.json`` and starts this
module; it trains with the ordinary trainer (resuming from the run's checkpoints, if any), which
writes ``RUN_DIR/summary.json``. The sweep records the result; a worker never touches
results.jsonl, so several workers can share a runs folder.

Exit status: 0 finished, 130/143 stopped by SIGINT/SIGTERM (after a checkpoint, when checkpoints
are on), 75 (EXIT_NO_MEMORY_NOW) the step does not fit in the GPU memory free now but would on the
empty GPU (other runs hold it: the sweep starts it again later), 1 anything else (the traceback
goes to the run's worker.log).
"""

from __future__ import annotations

import json
import os
import sys

RUN_FILE = "sweep_run.json"
EXIT_NO_MEMORY_NOW = 75  # EX_TEMPFAIL: refused by the memory check while other runs hold the GPU


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m torchpeer.experiments.worker RUN_DIR", file=sys.stderr)
        return 2
    run_dir = args[0]
    with open(os.path.join(run_dir, RUN_FILE), encoding="utf-8") as fh:
        payload = json.load(fh)

    from torchpeer.lm import RunConfig, train
    from torchpeer.lm.memory import MemoryFitError
    from torchpeer.lm.train import TrainingInterrupted

    cfg = RunConfig.from_dict(payload["config"])
    try:
        train(cfg, run_dir, resume=True, progress=False)
    except TrainingInterrupted as e:
        print(f"worker: {e}; checkpoint {e.checkpoint}", flush=True)
        return 128 + e.signum
    except MemoryFitError as e:
        if e.capacity is None or e.needed > e.capacity:
            raise  # would not fit on the empty device either: a real failure
        print(f"worker: not now: {e}", flush=True)
        return EXIT_NO_MEMORY_NOW
    return 0


if __name__ == "__main__":
    sys.exit(main())
