"""Bring a device command's sweep output into a local runs folder (campaign.md, "Device procedure").

    python scripts/ingest_device.py /work/.device/3 --runs runs/ablate-experts \
        [--report experiments/results/2026-12-05-ablate-experts]

DEVICE_DIR is what one device call returned: NAME.tgz (``scripts/device_sweep.sh`` packs the runs
folder without checkpoints), sweep_NAME.log and smi_NAME.csv; a command that ran several sweeps side
by side returns one such trio per sweep, and the one whose NAME is RUNS's basename is taken. This script

* unpacks the tgz in a temporary folder and finds the runs folder in it (the one with results.jsonl,
  or with the run folders when the command's runs were all cut before any was recorded);
* copies every run folder of it into RUNS (files overwritten: the device's copy is the newer; a warm
  machine's later tgz holds all its runs, so ingesting several in order is safe);
* adds the records of runs that RUNS/results.jsonl lacks, keeping the lines already there and their
  order (a run recorded on both sides keeps the local record, and is named on stderr if the two
  differ);
* copies sweep_NAME.log and smi_NAME.csv as RUNS/sweep_commandK.log / smi_commandK.csv with the
  next free K, unless a file with the same bytes is already there (so a repeated ingest is a no-op);
* with --report OUT: ``torchpeer report RUNS --out OUT --with-runs`` and copies the logs there too.

Several DEVICE_DIRs are ingested in the order given. Exit status 2 with one line on a missing or
damaged input; nothing in RUNS is changed before every tgz has been read.
"""

from __future__ import annotations

import argparse
import filecmp
import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from torchpeer.data.atomic import write_text_atomic


def _fail(msg: str) -> None:
    print(f"ingest_device: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _unpack(device_dir: str, tmp: str, name: str) -> tuple[str, list[str]]:
    """-> (the runs folder inside the unpacked tgz, the log files beside the tgz). ``name``: the
    basename of RUNS; a command that ran several sweeps side by side left one NAME.tgz (with its
    sweep_NAME.log, smi_NAME.csv) per sweep, and the one named as RUNS is taken."""
    if not os.path.isdir(device_dir):
        _fail(f"{device_dir} is not a folder (give the files_at folder of a device call)")
    tgzs = sorted(glob.glob(os.path.join(device_dir, "*.tgz")))
    stem = "*"
    if len(tgzs) > 1:
        mine = os.path.join(device_dir, f"{name}.tgz")
        if mine not in tgzs:
            names = ", ".join(os.path.basename(t) for t in tgzs)
            _fail(f"{device_dir} holds {names} and no {name}.tgz; name RUNS after the sweep to ingest")
        tgzs, stem = [mine], name
    if len(tgzs) != 1:
        _fail(f"{device_dir} holds {len(tgzs)} .tgz files; expected the one device_sweep.sh packs")
    dest = os.path.join(tmp, os.path.basename(device_dir.rstrip("/")) or "device")
    try:
        with tarfile.open(tgzs[0]) as tar:
            try:
                tar.extractall(dest, filter="data")  # no links or paths out of dest
            except TypeError:  # Python < 3.10.12 / 3.11.4: no filter argument
                tar.extractall(dest)
    except (tarfile.TarError, OSError, EOFError) as e:
        _fail(f"{tgzs[0]} cannot be unpacked ({e}); fetch the device call's files again")
    # the runs folder: the one with results.jsonl, or (a command whose every run was cut, so nothing
    # was recorded yet) the parent of the run folders, each of which has its sweep_run.json
    found = sorted(
        {os.path.dirname(p) for p in glob.glob(os.path.join(dest, "**", "results.jsonl"), recursive=True)}
        | {
            os.path.dirname(os.path.dirname(p))
            for p in glob.glob(os.path.join(dest, "**", "sweep_run.json"), recursive=True)
        }
    )
    if len(found) != 1:
        _fail(f"{tgzs[0]} holds {len(found)} runs folders (results.jsonl or run folders); expected one")
    logs = sorted(
        glob.glob(os.path.join(device_dir, f"sweep_{stem}.log"))
        + glob.glob(os.path.join(device_dir, f"smi_{stem}.csv"))
    )
    return found[0], logs


def _records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    _fail(f"{path} line {n} is not JSON; repair or remove that line first")
    return out


def _copy_log(src: str, dest_dir: str) -> str | None:
    """src (sweep_X.log / smi_X.csv) -> dest_dir/sweep_commandK.log / smi_commandK.csv, K the next
    free number; None when a file with the same bytes is there already."""
    stem, ext = ("sweep", ".log") if os.path.basename(src).startswith("sweep_") else ("smi", ".csv")
    taken = glob.glob(os.path.join(dest_dir, f"{stem}_command*{ext}"))
    if any(filecmp.cmp(src, t, shallow=False) for t in taken):
        return None
    numbers = [int(k) for t in taken if (k := os.path.basename(t)[len(stem) + 8 : -len(ext)]).isdigit()]
    dest = os.path.join(dest_dir, f"{stem}_command{max(numbers, default=0) + 1}{ext}")
    shutil.copyfile(src, dest)
    return dest


def ingest(device_dirs: list[str], runs: str, report: str | None = None) -> dict:
    """Merge each device folder into ``runs`` (see the module docstring); -> what was added."""
    added: dict = {"runs": [], "records": [], "logs": []}
    with tempfile.TemporaryDirectory() as tmp:
        name = os.path.basename(os.path.normpath(runs))
        unpacked = [_unpack(d, tmp, name) for d in device_dirs]  # every input read before RUNS changes
        os.makedirs(runs, exist_ok=True)
        results = os.path.join(runs, "results.jsonl")
        for src, logs in unpacked:
            local = _records(results)
            known = {r["run"]: r for r in local}
            for name in sorted(os.listdir(src)):
                if os.path.isdir(os.path.join(src, name)):
                    shutil.copytree(os.path.join(src, name), os.path.join(runs, name), dirs_exist_ok=True)
                    added["runs"].append(name)
            new = []
            for rec in _records(os.path.join(src, "results.jsonl")):
                if rec["run"] not in known:
                    new.append(rec)
                    known[rec["run"]] = rec
                elif known[rec["run"]] != rec:
                    print(
                        f"ingest_device: {rec['run']} is recorded here already; kept the local record", file=sys.stderr
                    )
            if new:
                write_text_atomic(results, "".join(json.dumps(r, sort_keys=True) + "\n" for r in local + new))
                added["records"] += [r["run"] for r in new]
            for log in logs:
                if (dest := _copy_log(log, runs)) is not None:
                    added["logs"].append(dest)
    if report:
        subprocess.run([sys.executable, "-m", "torchpeer", "report", runs, "--out", report, "--with-runs"], check=True)
        for log in sorted(
            glob.glob(os.path.join(runs, "sweep_command*.log")) + glob.glob(os.path.join(runs, "smi_command*.csv"))
        ):
            shutil.copyfile(log, os.path.join(report, os.path.basename(log)))
    return added


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Details: the module docstring.")
    ap.add_argument("device_dirs", nargs="+", metavar="DEVICE_DIR", help="files_at folder(s) of device calls, in order")
    ap.add_argument("--runs", required=True, help="the local runs folder to merge into (e.g. runs/ablate-experts)")
    ap.add_argument("--report", help="then write `torchpeer report RUNS --with-runs` here, with the logs")
    args = ap.parse_args(argv)
    added = ingest(args.device_dirs, args.runs, args.report)
    print(
        f"ingested {len(args.device_dirs)} device folder(s) into {args.runs}: {len(added['records'])} new record(s)"
        + (f" ({', '.join(added['records'])})" if added["records"] else "")
        + f", {len(set(added['runs']))} run folder(s) copied, {len(added['logs'])} log(s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
