"""Several runs of a sweep at once (``torchpeer sweep SPEC --parallel N``), each in a worker process.

Why: the isoFLOP and ablation models are small; one of them leaves an H200 mostly idle (its
kernels are short and the step is launch-bound), so N runs side by side finish the sweep up to
~N times sooner. Each run is ``python -m torchpeer.experiments.worker RUN_DIR`` (worker.py) with
its output in ``RUN_DIR/worker.log``; only this process writes results.jsonl.

On a machine with several GPUs the workers are spread over them: each new run goes to the visible
GPU with the fewest runs (its worker sees only that one, CUDA_VISIBLE_DEVICES), so ``--parallel``
counts runs on the whole machine (e.g. 8 GPUs x 3 small runs each: ``--parallel 24``); restrict the
GPUs with CUDA_VISIBLE_DEVICES as usual.

Scheduling, in plan order (budget by budget): a free slot takes the next run whose estimated time
(runner.estimate_seconds) ends before ``time_limit``; a run that would not is passed over for a
shorter one (said once), one longer than the whole limit is skipped. ``stop_at`` (seconds after the
start) interrupts runs still training then with SIGINT: they checkpoint (when checkpoints are on)
and resume on the next invocation, or restart. A run refused by the memory check while other runs
hold the GPU (worker exit EXIT_NO_MEMORY_NOW; runs that ended in the same poll count as holding it)
goes back to the head of the queue, and no run starts until one of the running ones ends; refused
with nothing else running, it has failed. Workers on one GPU check their memory against the free
memory less what the runs started before them have reserved until their first step (a lock file and
a ledger per GPU, torchpeer/lm/start_lock.py), so runs started together do not all pass it against
the empty GPU. A failed run (other non-zero exit) is reported with the end of its log and not retried
in this invocation; the others go on.

Runs with progress to lose go first: those resuming a checkpoint start before fresh ones, and a run
that waited for memory is the next to start. Each such run gets its memory reserved in the GPU's
ledger by this process as it starts (``memory(run)`` bytes, StartLock.reserve_for), so the runs started
after it cannot pass their checks first and take what it needs. (2026-12-06: a run resumed at step 677
of 1,832 lost the race for memory to fresh runs started in the same poll three times in one command,
and its checkpoint was lost with the machine.)
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from torchpeer.experiments.plan import PlannedRun
from torchpeer.experiments.results import append_result, make_run_record
from torchpeer.experiments.worker import EXIT_NO_MEMORY_NOW, RUN_FILE
from torchpeer.lm.checkpoint import latest_checkpoint_step, list_checkpoints

POLL_SECONDS = 0.2
GRACE_SECONDS = 60.0  # after SIGINT at stop_at: time to finish a step and checkpoint before SIGKILL


@dataclass
class _Job:
    run: PlannedRun
    head: str
    proc: subprocess.Popen
    started: float
    log: object
    gpu: str | None = None
    lock: str | None = None  # its GPU's start lock (torchpeer/lm/start_lock.py)
    shared_seconds: float = 0.0  # integral over its wall time of the runs on its GPU (itself included)
    seen_seconds: float = 0.0

    def sharing(self) -> float | None:
        """The mean number of runs that trained on this run's GPU while it ran (itself included):
        its tokens/s is a share of the GPU, measured at this load (None before the first poll)."""
        return round(self.shared_seconds / self.seen_seconds, 2) if self.seen_seconds > 0 else None


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, as CUDA_VISIBLE_DEVICES names them (or 0..n-1 when it is
    unset); [] without CUDA. A worker given one of them sees only that GPU."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and not g.strip().startswith("-")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def least_loaded_gpu(gpus: list[str], jobs: list[_Job]) -> str | None:
    """The GPU of ``gpus`` with the fewest running jobs (the first such); None for fewer than 2 GPUs
    (the worker keeps the parent's view)."""
    if len(gpus) < 2:
        return None
    load = {g: 0 for g in gpus}
    for job in jobs:
        if job.gpu in load:
            load[job.gpu] += 1
    return min(gpus, key=lambda g: load[g])


def too_long_message(head: str, run: PlannedRun, estimate: float) -> str:
    return (
        f"{head}: skipped, its estimated {estimate:.0f} s exceed the whole time limit; run it on its own "
        f"(--only '{run.name}'; with train.checkpoint true it resumes across jobs)"
    )


def finished_message(head: str, rec: dict) -> str:
    loss = rec["valid"].get(rec["eval_set"], {}).get("loss")
    loss_text = "-" if loss is None else f"{loss:.4f}"
    rate = rec["tokens_per_s"] or 0
    shared = f" ({rec['sharing']:g} runs on its GPU on average)" if rec.get("sharing") else ""
    return f"{head}: finished in {rec['wall_seconds']:.0f} s, {rate:,.0f} tokens/s{shared}, loss {loss_text}"


def stopped_message(head: str, run: PlannedRun, rc: int) -> str:
    """The line for a run interrupted at the stop time: how far its newest checkpoint got, so that
    whoever plans the next command of a GPU lease sees what finishing it costs, and what is lost with
    the machine (checkpoints live on it). 2026-12-07: three 1e16 runs 54-76 % done were read as just
    started and given up in a lease's last command."""
    step = latest_checkpoint_step(run.run_dir)
    if not step or run.steps <= 0:
        return f"{head}: stopped (exit {rc}) with no checkpoint; it restarts next time"
    pct = 100.0 * step / run.steps
    return (
        f"{head}: stopped (exit {rc}) at step {step:,} of {run.steps:,} ({pct:.0f} %); it resumes from that "
        "checkpoint on this machine (checkpoints do not outlive it)"
    )


def worker_command() -> list[str]:
    return [sys.executable, "-m", "torchpeer.experiments.worker"]


def worker_env(parallel: int) -> dict[str, str]:
    """The workers share the machine's cores: intra-op threads = cores // parallel (at least 1), or
    the caller's OMP_NUM_THREADS where that is lower (a sweep inside a test run or a shared host)."""
    share = max(1, (os.cpu_count() or 1) // parallel)
    asked = os.environ.get("OMP_NUM_THREADS", "")
    threads = str(min(share, int(asked)) if asked.isdigit() and int(asked) > 0 else share)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TQDM_DISABLE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": root + (os.pathsep + path if path else ""),  # the same torchpeer as the parent
    }


def run_parallel(
    spec,
    todo: list[tuple[str, PlannedRun]],
    runs_dir: str,
    parallel: int,
    estimate: Callable[[PlannedRun], float | None],
    time_limit: float | None = None,
    stop_at: float | None = None,
    say: Callable[[str], None] = print,
    command: list[str] | None = None,
    on_recorded: Callable[[PlannedRun], None] | None = None,
    gpus: list[str] | None = None,
    memory: Callable[[PlannedRun], int | None] | None = None,
    longest_first: bool = False,
) -> list[dict]:
    """Train ``todo`` ([(head, run)], plan order) ``parallel`` at a time; returns the new records.

    ``estimate(run)``: its expected seconds from the records so far (None = unknown, always started).
    ``command``: the worker command; ``on_recorded(run)``: called once a run's record is written
    (e.g. to drop its checkpoints). ``gpus``: the GPU ids to spread the workers over (default:
    ``visible_gpus()``; with fewer than 2 every worker keeps this process's view). ``memory(run)``: the
    bytes a run's step needs (None = unknown), reserved for the runs that go first (module docstring).
    ``longest_first``: after the resuming runs, the fresh ones by estimate, longest (and unknown) first:
    a GPU lease's first commands then start the runs that its time-limited last one could not.
    """
    t0, new = time.time(), []
    first = {run.name for _, run in todo if list_checkpoints(run.run_dir)}  # resuming: they go first

    def rank(run: PlannedRun) -> float:
        seconds = estimate(run) if longest_first else 0.0
        return -math.inf if seconds is None else -seconds

    pending = sorted(todo, key=lambda hr: (hr[1].name not in first, rank(hr[1])))  # stable: else plan order
    jobs: list[_Job] = []
    told: set[str] = set()
    interrupted, dropped = False, []
    env = worker_env(parallel)
    gpus = visible_gpus() if gpus is None else gpus
    hold = False  # a run waits for GPU memory: start nothing until a running run ends
    last = time.time()
    try:
        while pending or jobs:
            now = time.time()
            for job in jobs:  # how loaded each run's GPU was since the last poll (results' "sharing")
                job.shared_seconds += (now - last) * sum(1 for j in jobs if j.gpu == job.gpu)
                job.seen_seconds += now - last
            last = now
            ended = [j for j in jobs if j.proc.poll() is not None]
            refused = [j for j in ended if j.proc.returncode == EXIT_NO_MEMORY_NOW]
            # A run refused while another held memory (running, or ended since the last poll: in this
            # very window) was refused for that memory, not for its own size: it waits. Refused with no
            # other holder it has failed; of runs refused together with no other, the first retries.
            holders = len(jobs) - len(refused)
            # refusals first, so the log says "waits" before the ends that free its memory in this poll (and
            # those ends then release the hold: a retried refusal never waits on runs already gone)
            for job in sorted(ended, key=lambda j: j.proc.returncode != EXIT_NO_MEMORY_NOW):
                jobs.remove(job)
                retry = holders > 0 or (len(refused) > 1 and job is refused[0])
                if job.proc.returncode == EXIT_NO_MEMORY_NOW and retry and not interrupted:
                    job.log.close()
                    say(f"{job.head}: waits for GPU memory (others hold it); it starts again when a running run ends")
                    pending.insert(0, (job.head, job.run))
                    first.add(job.run.name)
                    hold = True
                    continue
                hold = False
                rec = _finish(job, spec, runs_dir, say)
                if rec is not None:
                    new.append(rec)
                    if on_recorded is not None:
                        on_recorded(job.run)
            elapsed = time.time() - t0
            if stop_at is not None and elapsed >= stop_at and jobs and not interrupted:
                say(f"stop time of {stop_at:.0f} s reached: interrupting {', '.join(j.run.name for j in jobs)}")
                for job in jobs:
                    job.proc.send_signal(signal.SIGINT)
                interrupted = True
            if interrupted and jobs and elapsed >= stop_at + GRACE_SECONDS:
                for job in jobs:
                    job.proc.kill()
            if interrupted and pending:
                dropped += pending
                pending = []
            blocked = False
            while pending and len(jobs) < parallel and not hold:
                pick = _next_startable(pending, estimate, elapsed, time_limit, told, say)
                if pick is None:
                    blocked = True
                    break
                head, run = pick
                if run.name not in first:
                    _warn_past_stop(head, estimate(run), elapsed, stop_at, say)
                gpu = least_loaded_gpu(gpus, jobs)
                job = _start(head, run, command or worker_command(), env, say, gpu)
                jobs.append(job)
                if run.name in first:
                    _reserve_first(job, memory, say)
            if not jobs and (blocked or not pending):
                break  # nothing running and nothing left that fits the limit: done for this invocation
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        say(f"interrupted: stopping {len(jobs)} running run(s) (they checkpoint when checkpoints are on)")
        for job in jobs:
            job.proc.send_signal(signal.SIGINT)
        for job in jobs:
            try:
                job.proc.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                job.proc.kill()
            job.log.close()
        raise
    left = [run.name for _, run in dropped + pending]
    if left:
        say(not_started_message(left))
    return new


def not_started_message(names: list[str]) -> str:
    """The line that ends an invocation stopped by its time limit: the runs left (the first 10 named)
    and how to go on."""
    more = f" and {len(names) - 10} more" if len(names) > 10 else ""
    return f"not started in this invocation: {', '.join(names[:10])}{more} (run the same command again)"


def _reserve_first(job: _Job, memory, say) -> None:
    """Reserve the memory of a run that goes first (resuming, or back from a wait) in its GPU's ledger
    for its worker's pid, before any later run starts (module docstring)."""
    from torchpeer.lm.start_lock import StartLock

    nbytes = memory(job.run) if memory is not None else None
    if job.lock and nbytes and StartLock(job.lock).reserve_for(job.proc.pid, nbytes):
        say(f"{job.head}: goes first: {nbytes / 2**30:.1f} GiB reserved for it until its first step")


def _warn_past_stop(head: str, est: float | None, elapsed: float, stop_at: float | None, say) -> None:
    """Say so when a fresh run's estimate ends after ``stop_at``: it will be interrupted, and on a lent
    GPU its checkpoint lasts only as long as the machine (2026-12-07: three 1e16 runs started with
    ~300 s of a lease left were lost at 55-62 %). Started all the same: a later command of the same
    lease resumes it, which is how a lease's first command is meant to work."""
    if stop_at is not None and est is not None and elapsed + est > stop_at:
        say(
            f"{head}: its estimated {est:.0f} s ends after the stop at {stop_at:.0f} s ({stop_at - elapsed:.0f} s "
            "from now): it will be interrupted there; only a later command on this machine can finish it"
        )


def _next_startable(pending, estimate, elapsed, time_limit, told, say):
    """Remove and return the first pending (head, run) that fits the time limit (None if none does)."""
    if time_limit is not None and elapsed >= time_limit:
        return None
    for i, (head, run) in enumerate(pending):
        est = estimate(run)
        if time_limit is None or est is None:
            return pending.pop(i)
        if est > time_limit:
            if run.name not in told:
                say(too_long_message(head, run, est))
                told.add(run.name)
            continue
        if elapsed + est <= time_limit:
            return pending.pop(i)
        if run.name not in told:
            say(f"{head}: not started, its estimated {est:.0f} s would pass the time limit of {time_limit:.0f} s")
            told.add(run.name)
    return None


def start_lock_path(gpu: str | None, env: dict) -> str:
    """The lock file that runs starting on this GPU share (torchpeer/lm/start_lock.py): one per GPU
    set, in the temp folder, so that two sweeps on one machine (e.g. two in one device job) share it."""
    import re
    import tempfile

    key = gpu if gpu is not None else (env.get("CUDA_VISIBLE_DEVICES") or "all")
    return os.path.join(tempfile.gettempdir(), f"torchpeer-start-{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.lock")


def _start(head: str, run: PlannedRun, command: list[str], env: dict, say, gpu: str | None = None) -> _Job:
    from torchpeer.data.atomic import write_text_atomic
    from torchpeer.lm.start_lock import ENV as START_LOCK_ENV

    if gpu is not None:
        env = {**env, "CUDA_VISIBLE_DEVICES": gpu}
    if not env.get(START_LOCK_ENV):  # memory checks one at a time per GPU (start_lock.py says why)
        env = {**env, START_LOCK_ENV: start_lock_path(gpu, env)}
    os.makedirs(run.run_dir, exist_ok=True)
    payload = {"run": run.name, "config": run.cfg.to_dict()}
    write_text_atomic(os.path.join(run.run_dir, RUN_FILE), json.dumps(payload, indent=1) + "\n")
    log = open(os.path.join(run.run_dir, "worker.log"), "a", encoding="utf-8")  # noqa: SIM115 (closed in _finish)
    log.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)} {run.run_dir}\n")
    log.flush()
    proc = subprocess.Popen([*command, run.run_dir], stdout=log, stderr=subprocess.STDOUT, env=env)
    state = "resuming" if list_checkpoints(run.run_dir) else "starting"
    where = f"pid {proc.pid}" + (f", GPU {gpu}" if gpu is not None else "")
    say(f"{head}: {state} ({where}): {run.family}, {run.tokens:,} tokens in {run.steps} steps")
    return _Job(run, head, proc, time.time(), log, gpu, env.get(START_LOCK_ENV) or None)


def _finish(job: _Job, spec, runs_dir: str, say) -> dict | None:
    job.log.close()
    rc = job.proc.returncode
    summary_path = os.path.join(job.run.run_dir, "summary.json")
    if rc == 0 and os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as fh:
            rec = make_run_record(job.run, json.load(fh), spec, wall_seconds=time.time() - job.started)
        sharing = job.sharing()
        if sharing is not None:
            rec["sharing"] = sharing
        append_result(runs_dir, rec)
        say(finished_message(job.head, rec))
        return rec
    if rc in (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGKILL):
        say(stopped_message(job.head, job.run, rc))
        return None
    with open(os.path.join(job.run.run_dir, "worker.log"), encoding="utf-8", errors="replace") as fh:
        tail = fh.read()[-1500:]
    say(f"{job.head}: FAILED (exit {rc}); end of {job.run.run_dir}/worker.log:\n{tail}")
    return None
