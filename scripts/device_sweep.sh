#!/usr/bin/env bash
# One GPU job of a sweep on the device machine, as docs/research/campaign.md ("Device procedure") runs it:
#   bash scripts/device_sweep.sh SPEC RUNS_DIR [torchpeer sweep options ...]
# e.g. bash scripts/device_sweep.sh isoflop runs/isoflop --parallel 8 --time-limit 470 --stop-at 525 --drop-checkpoints
# or, in a command that runs other things first: export DEVICE_END=$(( $(date +%s) + 590 )) at its start
# and no --stop-at (see DEVICE_END below)
# Run from the repo root. The package is imported from .snap/ (a `git archive` of the commit, made here
# before the call, its commit in .snap/COMMIT) when it exists, so that uncommitted edits in the
# checkout never reach a run;
# PYTHONSAFEPATH keeps the checkout's own torchpeer/ out of sys.path, in the sweep's workers too.
# A runs folder too large to carry: carry .carry/<name>/results.jsonl instead (see "The slim carry").
# Writes to $OUT: sweep_<name>.log, smi_<name>.csv (GPU load every 10 s) and <name>.tgz (the runs folder
# without checkpoints: unpack it here with `tar xzf <name>.tgz`). Exit status: the sweep's.
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash scripts/device_sweep.sh SPEC RUNS_DIR [sweep options ...]" >&2
    exit 2
fi
spec=$1 runs=$2
shift 2
: "${OUT:?set OUT to the folder that comes back (the device tool sets it)}"
name=$(basename "$runs")
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if [ -d .snap/torchpeer ]; then
    export PYTHONPATH="$PWD/.snap${PYTHONPATH:+:$PYTHONPATH}"
    # the commit of the snapshot (written with it: git rev-parse --short HEAD > .snap/COMMIT), kept in
    # every results record ("code"); the device machine has no .git to ask
    [ -f .snap/COMMIT ] && export TORCHPEER_COMMIT="$(cat .snap/COMMIT)"
else
    echo "device_sweep: no .snap/ here: running the checkout's torchpeer/" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 -c "import torchpeer; print('device_sweep: torchpeer from', torchpeer.__file__)" || exit 3
# The slim carry: a call may carry 64 MiB in all, and the tracked files plus .corpus leave a few MB, less
# than a study's whole runs folder (campaign.md, "Device procedure"). A runs folder's results.jsonl is
# all the sweep needs to skip the runs already done, so when RUNS_DIR has none and
# .carry/<name>/results.jsonl was carried, it starts from that copy (ingest_device.py merges the new
# runs back into the full folder here). A RUNS_DIR already on the machine (a warm lease) is left as is.
if [ ! -e "$runs/results.jsonl" ] && [ -f ".carry/$name/results.jsonl" ]; then
    mkdir -p "$runs" && cp ".carry/$name/results.jsonl" "$runs/results.jsonl" || exit 3
    echo "device_sweep: $runs/results.jsonl from .carry/$name ($(wc -l < "$runs/results.jsonl") runs done)"
fi
# DEVICE_END (epoch seconds; e.g. `export DEVICE_END=$(( $(date +%s) + 590 ))` first thing in a device
# command): the time by which the sweep must have stopped, checkpointed and been packed. --stop-at
# counts from the sweep's own start, so anything that ran before it in the command (tests, a guard)
# pushed the stop past the command's limit, which killed it before it could checkpoint or pack
# (2026-12-05, batch 7). With DEVICE_END and no --stop-at given, the stop is DEVICE_END less now
# less PACK_SECONDS (default 45: interrupt checkpoints and the tar).
if [ -n "${DEVICE_END:-}" ] && [[ " $* " != *" --stop-at "* ]]; then
    left=$(( DEVICE_END - $(date +%s) - ${PACK_SECONDS:-45} ))
    if [ "$left" -lt 30 ]; then
        echo "device_sweep: DEVICE_END leaves ${left} s to train (< 30): not starting" >&2
        exit 4
    fi
    echo "device_sweep: --stop-at $left (DEVICE_END less ${PACK_SECONDS:-45} s to checkpoint and pack)"
    set -- "$@" --stop-at "$left"
fi
smi=""
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv -l 10 > "$OUT/smi_$name.csv" 2>&1 &
    smi=$!
fi
pack() {  # the runs folder without checkpoints (metrics, summaries, results.jsonl) -> $OUT/<name>.tgz
    if [ -d "$runs" ]; then
        tar czf "$OUT/$name.tgz.tmp" --exclude=checkpoints --warning=no-file-changed "$runs" 2> /dev/null
        mv -f "$OUT/$name.tgz.tmp" "$OUT/$name.tgz"
    fi
}
# A command killed at the device's time limit (SIGTERM) used to lose everything, the metrics of its
# runs included, because the tar came only after the sweep (batch 7). On SIGTERM/SIGINT: pack what
# the runs have written so far at once (seconds), then pass the signal on to the sweep (its runs
# write interrupt checkpoints, for a resume on the same machine), and pack again when it has ended.
# The sweep runs in the background, so that `wait` returns to the trap as the signal arrives.
on_signal() {
    echo "device_sweep: signal $1: packing what the runs have written so far" >&2
    pack
    [ -n "$sweep" ] && kill -s "$1" "$sweep" 2> /dev/null && wait "$sweep"
    [ -n "$smi" ] && kill "$smi" 2> /dev/null
    wait  # the log's tee (bash >= 5.1 waits for the last process substitution too)
    pack
    exit $((128 + $2))
}
sweep=""
trap 'on_signal TERM 15' TERM
trap 'on_signal INT 2' INT
python3 -m torchpeer.cli sweep "$spec" --runs-dir "$runs" --no-progress "$@" > >(tee "$OUT/sweep_$name.log") 2>&1 &
sweep=$!
wait "$sweep"
rc=$?
trap - TERM INT
[ -n "$smi" ] && kill "$smi" 2> /dev/null
wait  # the log's tee (see on_signal)
pack
exit "$rc"
