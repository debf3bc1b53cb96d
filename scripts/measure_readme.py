"""Re-measure the README's main-job numbers and say when and on what machine.

    python scripts/measure_readme.py                 # torchpeer train (ptb-tiny), ~4-6 min on 2 CPU cores
    python scripts/measure_readme.py --install       # also time the README's install in a new venv
    python scripts/measure_readme.py -- --train.max_steps 20    # overrides for a quick try (not README numbers)

The main job is run as a new user runs it: ``torchpeer train`` in a fresh working folder, so the
BPE tokenizer is trained and PTB tokenised inside the timed command. Measured: wall time of the
command, training seconds (summary.json), validation perplexity, bits per byte, expert usage and
KL of every routed layer; with ``--install`` the seconds of ``pip install torch==2.13.0 -e .`` in a new
virtual environment. The record (with the date, CPU model, cores, load average before and after,
Python and torch versions, the git commit) goes to benchmarks/results/readme_numbers_<date>.json and
.md, and a README paragraph is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PIN = "torch==2.13.0"
DEFAULT_REPRODUCE = "python scripts/measure_readme.py"
PPL_LINE = re.compile(
    r"validation perplexity \((?P<set>[^)]+)\): (?P<ppl>[\d.]+) per token, (?P<bpb>[\d.]+) bits per byte"
)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_info() -> dict:
    import torch

    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def git_commit() -> str | None:
    """Short commit of the checkout, with "+changes" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return None
    commit = head.stdout.strip()
    return (commit + ("+changes" if dirty.stdout.strip() else "")) or None


def parse_train_stdout(text: str) -> dict[str, dict[str, float]]:
    """{eval set: {"ppl", "bpb"}} from the 'validation perplexity (SET): ...' lines of torchpeer train."""
    return {m["set"]: {"ppl": float(m["ppl"]), "bpb": float(m["bpb"])} for m in PPL_LINE.finditer(text)}


def numbers_from_summary(summary: dict) -> dict:
    """The README's numbers from a run's summary.json: per eval set ppl, bpb, and usage / KL per layer."""
    sets = {}
    for name, r in summary.get("valid", {}).items():
        sets[name] = {
            "ppl": r["ppl"],
            "bpb": r["bpb"],
            "loss": r["loss"],
            "tokens": r.get("tokens"),
            "layers": {layer: {"usage_pct": u["usage_pct"], "kl": u["kl"]} for layer, u in r.get("usage", {}).items()},
        }
    return {
        "config": summary.get("name"),
        "steps": summary.get("steps"),
        "tokens": summary.get("tokens"),
        "train_seconds": summary.get("train_seconds"),
        "total_params": summary.get("total_params"),
        "active_params": summary.get("active_params"),
        "valid": sets,
    }


def time_install(python: str = sys.executable) -> float:
    """Seconds of the README's install (``pip install torch==2.13.0 -e .``) in a new virtual environment."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([python, "-m", "venv", os.path.join(tmp, "venv")], check=True)
        pip = os.path.join(tmp, "venv", "bin", "pip")
        t0 = time.time()
        subprocess.run([pip, "install", "-q", TORCH_PIN, "-e", REPO], check=True)
        return round(time.time() - t0, 1)


def train_command() -> list[str]:
    """The ``torchpeer`` console script of this interpreter's environment (else ``python -m torchpeer.cli``)."""
    script = os.path.join(os.path.dirname(sys.executable), "torchpeer")
    return [script] if os.path.isfile(script) else [sys.executable, "-m", "torchpeer.cli"]


def run_main_job(overrides: list[str], threads: int | None = None) -> dict:
    """``torchpeer train [overrides]`` in a fresh folder; wall seconds, stdout numbers, summary numbers.

    threads: OMP_NUM_THREADS for the run; None = torch's default (all cores), as the README's command.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as work:
        run_dir = os.path.join(work, "runs", "main")
        cmd = [*train_command(), "train", *overrides, "--run-dir", run_dir]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
        wall = time.time() - t0
        if proc.returncode != 0:
            raise SystemExit(f"torchpeer train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as fh:
            summary = json.load(fh)
    numbers = numbers_from_summary(summary)
    printed = parse_train_stdout(proc.stdout)
    for name, p in printed.items():  # the printed line must agree with summary.json
        s = numbers["valid"].get(name)
        if s is None or abs(s["ppl"] - p["ppl"]) > 0.006 or abs(s["bpb"] - p["bpb"]) > 0.00006:
            raise SystemExit(f"printed numbers {p} disagree with summary.json {s} for {name}")
    command = " ".join(["torchpeer train", *overrides])
    return {"command": command, "threads": threads or "default", "wall_seconds": round(wall, 1), **numbers}


def format_markdown(rec: dict) -> str:
    """The record as a markdown report."""
    m = rec["machine"]
    lines = [
        f"# README numbers, {rec['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}; {m['platform']}.",
        f"Load average (1 min) before / after: {rec['load_before']:.2f} / {rec['load_after']:.2f}.",
        f"Commit: {rec.get('commit') or 'unknown'}. Reproduce: `{rec.get('reproduce', DEFAULT_REPRODUCE)}`.",
        "",
        "| what | value |",
        "| --- | ---: |",
    ]
    if rec.get("install_seconds") is not None:
        lines.append(f"| install (`pip install {TORCH_PIN} -e .`, new venv) | {rec['install_seconds']:.0f} s |")
    job = rec["main_job"]
    lines += [
        f"| `{job['command']}` wall time (threads: {job['threads']}) | "
        f"{job['wall_seconds'] / 60:.1f} min ({job['wall_seconds']:.0f} s) |",
        f"| training time (summary.json) | {job['train_seconds']:.0f} s |",
        f"| steps / tokens | {job['steps']} / {job['tokens']:,} |",
    ]
    for name, s in job["valid"].items():
        lines.append(f"| validation perplexity ({name}) | {s['ppl']:.2f} |")
        lines.append(f"| bits per byte ({name}) | {s['bpb']:.4f} |")
        for layer, u in s["layers"].items():
            lines.append(f"| expert usage / KL ({name}, {layer}) | {u['usage_pct']:.1f} % / {u['kl']:.2f} |")
    return "\n".join(lines) + "\n"


def readme_paragraph(rec: dict) -> str:
    """A README sentence with the measured numbers (first eval set, first routed layer)."""
    job, m = rec["main_job"], rec["machine"]
    name, s = next(iter(job["valid"].items()))
    usage = next(iter(s["layers"].values()), None)
    install = f"install {rec['install_seconds']:.0f} s, then " if rec.get("install_seconds") is not None else ""
    text = (
        f"Measured on a {m['cores']}-core CPU machine ({m['cpu']}; torch {m['torch']}) on {rec['date']}: {install}"
        f"`{job['command']}` ran {job['wall_seconds'] / 60:.1f} minutes and reported validation perplexity "
        f"{s['ppl']:.2f} per BPE token ({s['bpb']:.3f} bits per byte)"
    )
    if usage:
        text += f", expert usage {usage['usage_pct']:.1f} %, KL {usage['kl']:.2f}"
    return text + f" (`{rec.get('reproduce', DEFAULT_REPRODUCE)}`)."


def write_results(rec: dict, out_dir: str) -> tuple[str, str]:
    """benchmarks/results/readme_numbers_<date>.{json,md}, written atomically."""
    from torchpeer.data.atomic import write_json_atomic, write_text_atomic

    stem = os.path.join(out_dir, f"readme_numbers_{rec['date']}")
    write_json_atomic(stem + ".json", rec)
    write_text_atomic(stem + ".md", format_markdown(rec))
    return stem + ".json", stem + ".md"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--install", action="store_true", help="also time the README's install in a new venv")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the run (default: unset, as in the README)")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"), help="where the record goes")
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    rec = {
        "date": dt.date.today().isoformat(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "commit": git_commit(),
        "load_before": os.getloadavg()[0],
        "install_seconds": time_install() if args.install else None,
        "reproduce": " ".join(["python scripts/measure_readme.py", *argv]),
    }
    rec["main_job"] = run_main_job(overrides, args.threads)
    rec["load_after"] = os.getloadavg()[0]
    if overrides:
        rec["note"] = "run with overrides: not the README's main job"
    paths = write_results(rec, args.out_dir)
    print(format_markdown(rec))
    print("README text:\n" + readme_paragraph(rec))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
