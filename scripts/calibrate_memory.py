"""Compare torchpeer.lm.memory's step estimate with the measured peak RSS of real CPU training runs.

    python scripts/calibrate_memory.py            # a few tiny configs, ~1 min on 2 cores
    python scripts/calibrate_memory.py --json out.json

Each config trains for a few steps in a fresh subprocess (byte tokenizer on a generated text file,
no checkpoints, no evaluation). The child resets its peak RSS (``/proc/self/clear_refs``) when the
trainer checks the estimate, so the measured growth is what training allocated after it; the
ratio measured / estimated is printed per config (the growth includes everything the trainer still
allocates after the check: model, optimizer, steps, lazy imports). Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# name -> overrides on top of BASE (each a tiny model; sizes chosen so that different parts dominate)
CONFIGS = {
    "peer-b16-s128": "--model.ffw peer --train.batch_size 16 --model.seq_len 128",
    "peer-b4-s512-N65k": "--model.ffw peer --train.batch_size 4 --model.seq_len 512 --model.peer.n_experts 65536",
    "dense-b32-s256": "--model.ffw dense --train.batch_size 32 --model.seq_len 256",
    "pkm-b8-s128": "--model.ffw pkm --train.batch_size 8 --model.seq_len 128",
    "moe-b8-s128": "--model.ffw moe --train.batch_size 8 --model.seq_len 128",
}

BASE = (
    "--model.d_model 128 --model.n_layers 2 --model.n_heads 4 "
    "--model.peer.n_experts 16384 --model.peer.heads 4 --model.peer.top_k 8 --model.peer.d_key 64 "
    "--model.pkm.n_keys 128 --model.pkm.heads 2 --model.pkm.top_k 8 --model.pkm.d_key 64 --model.moe.n_experts 8 "
    "--train.device cpu --train.max_steps 3 --train.warmup_steps 1 --train.checkpoint false "
    "--train.tensorboard false --train.log_interval 1 --train.eval_interval 1000"
)

CHILD = r"""
import json, os, sys
import torch
from torchpeer.data import load_tokenizer, prepare_split
from torchpeer.lm import load_config, memory, train
from torchpeer.lm.memory import estimate_step_memory

overrides, run_dir = json.loads(sys.argv[1]), sys.argv[2]
cfg = load_config("ptb-tiny", overrides)
tok = load_tokenizer(cfg.data, False)
prepare_split(cfg.data, cfg.data.train, "train", tokenizer=tok, progress=False)
cfg.model.vocab_size = tok.vocab_size
est = estimate_step_memory(cfg, "cpu")

def rss(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)

def reset_peak():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS
    return rss("VmRSS")

# Measure from the moment the trainer checks the estimate (what it has to fit from there on).
start = {"rss": reset_peak()}
check_fits = memory.check_fits

def checked(*args, **kwargs):
    result = check_fits(*args, **kwargs)
    start["rss"], start["checked"] = reset_peak(), True
    return result

memory.check_fits = checked
train(cfg, run_dir, progress=False)
rec = {"measured": rss("VmHWM") - start["rss"], "estimate": est.total, "parts": est.breakdown()}
print(json.dumps({**rec, "from_check": start.get("checked", False)}))
"""


def measure(name: str, overrides: str, root: str) -> dict:
    """Train config ``name`` (BASE + ``overrides``, space-separated) in a subprocess; the record has
    measured and estimated bytes and their ratio. ``root`` holds train.txt."""
    run_dir = os.path.join(root, name)
    args = (
        BASE.split()
        + overrides.split()
        + [
            "--data.train",
            os.path.join(root, "train.txt"),
            "--data.tokenizer",
            "byte",
            "--data.cache_dir",
            os.path.join(root, "cache"),
        ]
    )
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TQDM_DISABLE="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args), run_dir], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["name"], rec["ratio"] = name, rec["measured"] / rec["estimate"]
    return rec


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the records to this JSON file")
    ap.add_argument("--only", nargs="*", help="config names to run (default: all)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        text = "".join(f"line {i} of some plain training text, with numbers {i * 7 % 1000}\n" for i in range(20000))
        with open(os.path.join(root, "train.txt"), "w") as fh:
            fh.write(text)
        records = []
        for name in args.only or CONFIGS:
            rec = measure(name, CONFIGS[name], root)
            records.append(rec)
            print(
                f"{name:22s} estimate {rec['estimate'] / 2**20:8.1f} MiB  measured {rec['measured'] / 2**20:8.1f} MiB"
                f"  ratio {rec['ratio']:.2f}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)


if __name__ == "__main__":
    main()
