"""`torchpeer sweep --parallel N`: runs in worker processes, N at a time, each recorded once by the
sweep; a failed worker does not stop the others; --stop-at interrupts; the time limit packs runs;
the real worker trains and its result equals the in-process run's."""

import json
import os
import shutil
import sys
import textwrap
import time

import pytest

from torchpeer.experiments import parse_spec, read_results, run_sweep
from torchpeer.experiments import pool as pool_mod
from torchpeer.experiments.plan import plan_sweep

# A stand-in worker: writes what the trainer writes (config.json, summary.json) after SLEEP seconds,
# logs its start/end times; exits 1 for runs named in FAIL; exits 130 on SIGINT.
FAKE_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    run_dir = sys.argv[1]
    def _stop(*a):  # CKPT_ON_STOP: checkpoint at step 2 as the trainer does when interrupted
        if os.environ.get("CKPT_ON_STOP"):
            step_dir = os.path.join(run_dir, "checkpoints", "step_2")
            os.makedirs(step_dir, exist_ok=True)
            open(os.path.join(step_dir, "trainer.pt"), "w").close()
        sys.exit(130)
    signal.signal(signal.SIGINT, _stop)
    payload = json.load(open(os.path.join(run_dir, "sweep_run.json")))
    cfg = payload["config"]
    t0 = time.time()
    if payload["run"] in os.environ.get("FAIL", "").split(","):
        print("boom: a deliberate failure", flush=True)
        sys.exit(1)
    marker = os.path.join(run_dir, "refused_once")
    if payload["run"] in os.environ.get("NOMEM", "").split(",") and not os.path.exists(marker):
        time.sleep(float(os.environ.get("NOMEM_DELAY", "0")))
        open(marker, "w").close()  # refused by the memory check once (others hold the GPU), then fits
        print("worker: not now: a training step needs about 80 GiB", flush=True)
        sys.exit(75)
    if payload["run"] in os.environ.get("NOMEM_ALWAYS", "").split(","):
        print("worker: not now: a training step needs about 80 GiB", flush=True)
        sys.exit(75)
    time.sleep(float(os.environ.get("SLEEP", "0.5")))
    cfg["model"]["vocab_size"] = 257
    json.dump(cfg, open(os.path.join(run_dir, "config.json"), "w"))
    tokens = cfg["train"]["batch_size"] * cfg["model"]["seq_len"] * 3
    summary = {"steps": 3, "tokens": tokens, "train_flops": tokens * 1000, "train_seconds": 0.5,
               "total_params": 1234, "active_params": 1000 + cfg["model"]["d_model"],
               "train_flops_per_token": 1000,
               "valid": {"small": {"loss": 2.0, "ppl": 7.39, "bpb": 1.2, "tokens": 99, "usage": {}}}}
    json.dump(summary, open(os.path.join(run_dir, "summary.json"), "w"))
    with open(os.path.join(os.path.dirname(run_dir), "times.txt"), "a") as fh:
        fh.write(f"{payload['run']} {t0} {time.time()}\\n")
    with open(os.path.join(os.path.dirname(run_dir), "gpus.txt"), "a") as fh:
        fh.write(f"{payload['run']} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')} {t0} {time.time()}\\n")
    with open(os.path.join(os.path.dirname(run_dir), "locks.txt"), "a") as fh:
        fh.write(f"{os.environ.get('CUDA_VISIBLE_DEVICES', '-')} {os.environ.get('TORCHPEER_START_LOCK', '-')}\\n")
    """
)
# Prepended to FAKE_WORKER's body where a test needs it: each worker writes, as it starts, its pid and
# the start-lock ledger it sees (what the reservations of runs started before it say).
LEDGER_SNAPSHOT = textwrap.dedent(
    """
    import json, os, sys
    _lock = os.environ.get("TORCHPEER_START_LOCK")
    try:
        _seen = json.load(open(_lock + ".reservations.json"))
    except (OSError, ValueError, TypeError):
        _seen = {}
    _run = json.load(open(os.path.join(sys.argv[1], "sweep_run.json")))["run"]
    with open(os.path.join(os.path.dirname(sys.argv[1]), "ledger.txt"), "a") as fh:
        fh.write(json.dumps({"run": _run, "pid": os.getpid(), "seen": _seen}) + "\\n")
    """
)


def spec_for(tmp_path, budgets=(1e10, 2e10)):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat. " * 400)
    return parse_spec(
        {
            "sweep": {"base": "ptb-tiny", "budgets": list(budgets), "kind": "isoflop"},
            "base": {
                "train.device": "cpu",
                "train.batch_size": 4,
                "train.warmup_steps": 1,
                "train.log_interval": 1,
                "train.checkpoint": False,
                "train.tensorboard": False,
                "train.eval_batches": 2,
                "model.seq_len": 32,
                "model.n_layers": 2,
                "model.n_heads": 2,
                "model.peer.n_experts": 64,
                "model.peer.heads": 2,
                "model.peer.top_k": 2,
                "model.peer.d_key": 8,
                "data.tokenizer": "byte",
                "data.train": str(text),
                "data.valid.small": str(text),
                "data.cache_dir": str(tmp_path / "cache"),
            },
            "grid": {"model.d_model": [16, 32], "model.ffw": ["dense", "peer"]},
        }
    )


@pytest.fixture
def fake_worker(tmp_path, monkeypatch):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(pool_mod, "worker_command", lambda: [sys.executable, str(script)])
    monkeypatch.setenv("SLEEP", "0.5")
    monkeypatch.delenv("FAIL", raising=False)
    monkeypatch.delenv("NOMEM", raising=False)
    monkeypatch.delenv("NOMEM_ALWAYS", raising=False)
    monkeypatch.delenv("CKPT_ON_STOP", raising=False)
    return script


def intervals(runs_dir):
    with open(os.path.join(runs_dir, "times.txt")) as fh:
        return [(name, float(a), float(b)) for name, a, b in (line.split() for line in fh)]


def max_overlap(spans):
    events = sorted([(a, 1) for _, a, _ in spans] + [(b, -1) for _, _, b in spans])
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def test_parallel_runs_each_recorded_once_at_most_n_at_a_time(tmp_path, fake_worker):
    spec, runs_dir, msgs = spec_for(tmp_path), str(tmp_path / "runs"), []
    new = run_sweep(spec, runs_dir, parallel=3, progress=False, say=msgs.append)
    recs = read_results(runs_dir)
    assert len(new) == 8 and sorted(r["run"] for r in recs) == sorted(r["run"] for r in new)
    assert len({r["run"] for r in recs}) == 8  # each run once
    spans = intervals(runs_dir)
    assert len(spans) == 8 and max_overlap(spans) == 3  # never more than --parallel at once, and really parallel
    assert any(m.startswith("data ready:") for m in msgs)  # tokenised once, before the workers
    r = recs[0]
    assert r["train_split_tokens"] > 0 and r["epochs"] == pytest.approx(r["tokens"] / r["train_split_tokens"], 1e-3)
    assert r["seed"] == 0
    # each record says how many runs shared its GPU on average while it ran (its tokens/s is a share)
    assert all(1.0 <= rec["sharing"] <= 3.0 for rec in recs) and max(rec["sharing"] for rec in recs) > 1.5
    assert sum("runs on its GPU on average" in m for m in msgs) == 8
    # the dry run of a larger sweep says its estimates come from rates measured at that load
    msgs.clear()
    run_sweep(spec_for(tmp_path, budgets=(1e10, 2e10, 4e10)), runs_dir, dry_run=True, say=msgs.append)
    assert "measured tokens/s are each run's share of its GPU: " in msgs[0]
    # a second invocation trains nothing
    msgs.clear()
    assert run_sweep(spec, runs_dir, parallel=3, progress=False, say=msgs.append) == []
    assert sum("done, skipped" in m for m in msgs) == 8


def test_workers_are_spread_over_the_visible_gpus(tmp_path, fake_worker, monkeypatch):
    """Two visible GPUs (named 3 and 5), 4 runs at a time: each worker sees one GPU, both GPUs are
    used, and neither ever has more than 2 runs at once."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    spec, runs_dir, msgs = spec_for(tmp_path), str(tmp_path / "runs"), []
    run_sweep(spec, runs_dir, parallel=4, progress=False, say=msgs.append)
    with open(os.path.join(runs_dir, "gpus.txt")) as fh:
        rows = [line.split() for line in fh]
    assert len(rows) == 8 and {gpu for _, gpu, _, _ in rows} == {"3", "5"}
    for gpu in ("3", "5"):
        spans = [(name, float(a), float(b)) for name, g, a, b in rows if g == gpu]
        assert max_overlap(spans) <= 2, gpu
    assert sum(", GPU 3)" in m for m in msgs) + sum(", GPU 5)" in m for m in msgs) == 8


def test_workers_on_one_gpu_share_its_start_lock(tmp_path, fake_worker, monkeypatch):
    """Each worker gets the start lock of its GPU (torchpeer/lm/start_lock.py): one file per GPU in
    the temp folder, the same for two sweeps on one machine; a lock the user set is kept."""
    from torchpeer.experiments.pool import start_lock_path

    monkeypatch.delenv("TORCHPEER_START_LOCK", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    spec, runs_dir = spec_for(tmp_path), str(tmp_path / "runs")
    run_sweep(spec, runs_dir, parallel=4, progress=False, say=lambda m: None)
    with open(os.path.join(runs_dir, "locks.txt")) as fh:
        rows = [line.split() for line in fh]
    assert len(rows) == 8 and {gpu for gpu, _ in rows} == {"3", "5"}
    for gpu, lock in rows:
        assert lock == start_lock_path(gpu, {}) and os.path.basename(lock) == f"torchpeer-start-{gpu}.lock"
    assert start_lock_path(None, {"CUDA_VISIBLE_DEVICES": "0,1"}) != start_lock_path(None, {})
    assert os.path.basename(start_lock_path(None, {})) == "torchpeer-start-all.lock"
    monkeypatch.setenv("TORCHPEER_START_LOCK", str(tmp_path / "mine.lock"))
    runs2 = str(tmp_path / "runs2")
    run_sweep(spec, runs2, parallel=2, progress=False, say=lambda m: None)
    with open(os.path.join(runs2, "locks.txt")) as fh:
        assert {line.split()[1] for line in fh} == {str(tmp_path / "mine.lock")}


def test_visible_gpus_and_the_least_loaded_one(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0, 2,7")
    assert pool_mod.visible_gpus() == ["0", "2", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CUDA hidden
    assert pool_mod.visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert pool_mod.visible_gpus() == []
    job = lambda gpu: pool_mod._Job(None, "", None, 0.0, None, gpu)  # noqa: E731
    assert pool_mod.least_loaded_gpu(["0"], []) is None  # one GPU: the worker keeps the parent's view
    assert pool_mod.least_loaded_gpu(["0", "1"], []) == "0"
    assert pool_mod.least_loaded_gpu(["0", "1"], [job("0")]) == "1"
    assert pool_mod.least_loaded_gpu(["0", "1", "2"], [job("0"), job("1"), job("0"), job("2")]) == "1"


def test_a_run_refused_for_memory_waits_for_a_running_run_to_end(tmp_path, fake_worker, monkeypatch):
    """A worker refused by the memory check while others run (exit 75) goes back to the queue and
    starts again only after a running run has ended; it is then recorded like the others. One that
    is refused with nothing else running has failed (it would never fit)."""
    spec, runs_dir, msgs = spec_for(tmp_path), str(tmp_path / "runs"), []
    victim = "d_model=32-ffw=peer-1e10"
    monkeypatch.setenv("NOMEM", victim)
    run_sweep(spec, runs_dir, parallel=3, progress=False, say=msgs.append)
    assert len({r["run"] for r in read_results(runs_dir)}) == 8
    waited = [i for i, m in enumerate(msgs) if victim in m and "waits for GPU memory" in m]
    assert len(waited) == 1 and not any("FAILED" in m for m in msgs)
    restart = next(i for i, m in enumerate(msgs) if i > waited[0] and victim in m and "starting" in m)
    assert any("finished in" in m for m in msgs[waited[0] : restart])  # another run ended in between
    # back from its wait it goes first: its memory is reserved before the next runs start
    assert victim in msgs[restart + 1] and "goes first:" in msgs[restart + 1] and "GiB reserved" in msgs[restart + 1]
    spans = intervals(runs_dir)
    assert max_overlap(spans) <= 3

    (tmp_path / "b").mkdir()
    spec2, runs2, msgs2 = spec_for(tmp_path / "b"), str(tmp_path / "runs2"), []
    monkeypatch.setenv("NOMEM_ALWAYS", victim)
    run_sweep(spec2, runs2, parallel=3, progress=False, say=msgs2.append)
    failed = [m for m in msgs2 if "FAILED" in m]
    assert len(failed) == 1 and victim in failed[0] and "not now" in failed[0]
    assert len({r["run"] for r in read_results(runs2)}) == 7


def test_resuming_runs_start_first_with_their_memory_reserved(tmp_path, fake_worker, monkeypatch):
    """A run with a checkpoint (progress to lose) starts before the fresh runs that precede it in plan
    order, and the sweep reserves its estimated memory in the start-lock ledger under its worker's pid
    before it starts the next runs, so their memory checks count it even if they come first."""
    from torchpeer.experiments.runner import step_memory_bytes

    fake_worker.write_text(LEDGER_SNAPSHOT + FAKE_WORKER)
    monkeypatch.setenv("TORCHPEER_START_LOCK", str(tmp_path / "gpu.lock"))
    monkeypatch.setenv("SLEEP", "1.0")
    spec, runs_dir, msgs = spec_for(tmp_path), str(tmp_path / "runs"), []
    runs = plan_sweep(spec, runs_dir)
    resumed = runs[-1]  # the last run in plan order
    ckpt = os.path.join(resumed.run_dir, "checkpoints", "step_00000002")
    os.makedirs(ckpt)
    open(os.path.join(ckpt, "trainer.pt"), "wb").close()
    run_sweep(spec, runs_dir, parallel=3, progress=False, say=msgs.append)
    starts = [m for m in msgs if ": starting (" in m or ": resuming (" in m]
    assert resumed.name in starts[0] and ": resuming (" in starts[0], starts
    assert all(": starting (" in m for m in starts[1:])
    nbytes = step_memory_bytes(resumed)
    assert nbytes and any(resumed.name in m and f"goes first: {nbytes / 2**30:.1f} GiB" in m for m in msgs)
    with open(os.path.join(runs_dir, "ledger.txt")) as fh:
        rows = [json.loads(line) for line in fh]
    pid = next(r["pid"] for r in rows if r["run"] == resumed.name)
    started_with_it = [r for r in rows if r["run"] in {n.split(": ")[0].split()[-1] for n in starts[1:3]}]
    assert len(started_with_it) == 2
    for row in started_with_it:  # the two runs started beside it saw its reservation
        assert row["seen"].get(str(pid), {}).get("bytes") == nbytes, row
    assert len({r["run"] for r in read_results(runs_dir)}) == 8


def _short_polls_after(msgs: list, text: str, count: int):
    """The sweep's `say`: collects its messages into msgs and, once `count` of them contain `text`
    (the long poll's race has been decided), goes back to short polls for the runs left, which only
    make the test slower with 2-s polls."""

    def say(m):
        msgs.append(m)
        if sum(text in x for x in msgs) >= count:
            pool_mod.POLL_SECONDS = 0.2  # monkeypatch restores the module's value after the test

    return say


def test_a_refusal_in_the_same_poll_as_the_last_other_runs_end_is_retried(tmp_path, fake_worker, monkeypatch):
    """The refused run and the only other running one end within one poll: the refusal came while the
    other held memory, so the run is retried (alone now), not failed. A CPU under load once made this
    happen in the test above (the pool looked at the runs left after removing the ones that ended)."""
    monkeypatch.setattr(pool_mod, "POLL_SECONDS", 2.0)  # both workers exit well inside one poll
    monkeypatch.setenv("SLEEP", "0.2")
    monkeypatch.setenv("NOMEM_DELAY", "0.2")
    spec, runs_dir, msgs = spec_for(tmp_path), str(tmp_path / "runs"), []
    victim = "d_model=16-ffw=peer-1e10"  # the second run in plan order: it starts beside the first
    monkeypatch.setenv("NOMEM", victim)
    run_sweep(spec, runs_dir, parallel=2, progress=False, say=_short_polls_after(msgs, "waits for GPU memory", 1))
    assert not any("FAILED" in m for m in msgs), msgs
    assert any(victim in m and "waits for GPU memory" in m for m in msgs)
    assert len({r["run"] for r in read_results(runs_dir)}) == 8


def test_runs_refused_together_with_no_other_run_end_as_failed(tmp_path, fake_worker, monkeypatch):
    """Two runs that never fit, refused in one poll with no other run holding memory: the sweep ends
    (no endless retry of the pair), both are reported failed, the other six are recorded."""
    monkeypatch.setattr(pool_mod, "POLL_SECONDS", 2.0)
    monkeypatch.setenv("SLEEP", "0.2")
    victims = ["d_model=16-ffw=dense-1e10", "d_model=16-ffw=peer-1e10"]  # the first two in plan order
    monkeypatch.setenv("NOMEM_ALWAYS", ",".join(victims))
    spec, runs_dir, msgs = spec_for(tmp_path), str(tmp_path / "runs"), []
    run_sweep(spec, runs_dir, parallel=2, progress=False, say=_short_polls_after(msgs, "FAILED", 1))
    failed = [m for m in msgs if "FAILED" in m]
    assert len(failed) == 2 and all(any(v in m for m in failed) for v in victims)
    assert len({r["run"] for r in read_results(runs_dir)}) == 6


def test_a_failed_worker_is_reported_and_the_others_finish(tmp_path, fake_worker, monkeypatch):
    spec, runs_dir, msgs = spec_for(tmp_path), str(tmp_path / "runs"), []
    victim = "d_model=16-ffw=peer-1e10"
    monkeypatch.setenv("FAIL", victim)
    run_sweep(spec, runs_dir, parallel=2, progress=False, say=msgs.append)
    recs = {r["run"] for r in read_results(runs_dir)}
    assert victim not in recs and len(recs) == 7
    failed = [m for m in msgs if "FAILED" in m]
    assert len(failed) == 1 and victim in failed[0] and "boom: a deliberate failure" in failed[0]
    monkeypatch.delenv("FAIL")
    run_sweep(spec, runs_dir, parallel=2, progress=False, say=lambda s: None)  # the next invocation retries it
    assert victim in {r["run"] for r in read_results(runs_dir)}


@pytest.mark.parametrize("parallel", [2, 1])
def test_stop_at_interrupts_running_workers(tmp_path, fake_worker, monkeypatch, parallel):
    """--stop-at S interrupts the runs still training at S; with --parallel 1 the one run trains in
    a worker process too (a GPU job of 2026-12-04 lost its command to an old refusal of that)."""
    monkeypatch.setenv("SLEEP", "60")
    monkeypatch.setattr(pool_mod, "GRACE_SECONDS", 5.0)
    spec, runs_dir, msgs = spec_for(tmp_path), str(tmp_path / "runs"), []
    t0 = time.time()
    run_sweep(spec, runs_dir, parallel=parallel, stop_at=1.5, progress=False, say=msgs.append)
    assert time.time() - t0 < 20
    assert read_results(runs_dir) == []
    assert any("stop time of" in m for m in msgs)
    # the running ones, nothing else started
    assert sum("stopped (exit 130)" in m for m in msgs) == parallel
    assert any(m.startswith("not started in this invocation:") for m in msgs)


def test_a_stopped_run_says_how_far_its_checkpoint_got(tmp_path, fake_worker, monkeypatch):
    """The stop line names the step of the run's newest checkpoint against its total (what the next
    command of a lease would have left to train); a run stopped before any checkpoint says it restarts."""
    monkeypatch.setenv("SLEEP", "60")
    monkeypatch.setattr(pool_mod, "GRACE_SECONDS", 5.0)
    spec, runs_dir, msgs = spec_for(tmp_path, budgets=(1e10,)), str(tmp_path / "runs"), []
    plan = {r.name: r for r in plan_sweep(spec, runs_dir)}
    monkeypatch.setenv("CKPT_ON_STOP", "1")
    run_sweep(spec, runs_dir, parallel=2, stop_at=1.5, progress=False, say=msgs.append)
    stopped = [m for m in msgs if "stopped (exit 130)" in m]
    assert len(stopped) == 2
    for m in stopped:
        run = plan[m.split(":")[0].split("] ")[-1]]
        assert f"at step 2 of {run.steps:,} ({100 * 2 / run.steps:.0f} %)" in m, m
    shutil.rmtree(runs_dir)
    monkeypatch.delenv("CKPT_ON_STOP")
    msgs.clear()
    run_sweep(spec, runs_dir, parallel=1, stop_at=1.5, progress=False, say=msgs.append)
    assert [m for m in msgs if "stopped (exit 130)" in m][0].endswith("with no checkpoint; it restarts next time")


def test_a_fresh_run_that_cannot_end_before_the_stop_is_announced(tmp_path, fake_worker, monkeypatch):
    """--stop-at without --time-limit: a fresh run whose estimate ends after the stop still starts (a
    lease's first command means it to), and the sweep says it will be interrupted; runs that fit, and
    runs with no estimate, start without the line."""
    from torchpeer.experiments import runner as runner_mod

    monkeypatch.setenv("SLEEP", "0.05")
    spec = spec_for(tmp_path, budgets=(1e10,))
    names = [r.name for r in plan_sweep(spec, str(tmp_path / "plan"))]
    seconds = dict(zip(names, (5.0, None, 900.0, 20.0)))
    monkeypatch.setattr(runner_mod, "estimate_seconds", lambda run, records, assume=None: seconds[run.name])
    msgs = []
    run_sweep(spec, str(tmp_path / "runs"), parallel=2, stop_at=600, progress=False, say=msgs.append)
    warned = [m for m in msgs if "ends after the stop at 600 s" in m]
    assert len(warned) == 1 and names[2] in warned[0] and "estimated 900 s" in warned[0], warned
    assert {r["run"] for r in read_results(str(tmp_path / "runs"))} == set(names)  # it started (and ended) all the same


def test_time_limit_skips_runs_longer_than_the_limit_and_runs_the_rest(tmp_path, fake_worker):
    spec, runs_dir, msgs = spec_for(tmp_path, budgets=(1e10,)), str(tmp_path / "runs"), []
    from torchpeer.experiments import plan_sweep

    plan = plan_sweep(spec, runs_dir)
    rate = 2000.0  # assumed tokens/s: each run's estimate is its tokens / 2000
    short = [r for r in plan if r.tokens / rate <= 40]
    long = [r for r in plan if r.tokens / rate > 40]
    assert short and long, [r.tokens for r in plan]
    run_sweep(spec, runs_dir, parallel=2, time_limit=40, assume_tokens_per_s=rate, progress=False, say=msgs.append)
    assert {r["run"] for r in read_results(runs_dir)} == {r.name for r in short}
    skipped = [m for m in msgs if "exceed the whole time limit" in m]
    assert len(skipped) == len(long) and all(any(r.name in m for m in skipped) for r in long)


def test_bad_parallel_arguments(tmp_path):
    spec = spec_for(tmp_path)
    with pytest.raises(ValueError, match="--parallel must be >= 1"):
        run_sweep(spec, str(tmp_path / "r"), parallel=0)
    with pytest.raises(ValueError, match="--stop-at must be > 0"):
        run_sweep(spec, str(tmp_path / "r"), stop_at=0)
    # before: a negative time limit skipped every run ('the time limit of -1 s is reached'), a negative
    # or zero rate planned negative or no times
    with pytest.raises(ValueError, match="--time-limit must be >= 0 seconds, got -1"):
        run_sweep(spec, str(tmp_path / "r"), time_limit=-1)
    for rate in (-5, 0):
        with pytest.raises(ValueError, match=f"--assume-tokens-per-s must be > 0, got {rate}"):
            run_sweep(spec, str(tmp_path / "r"), dry_run=True, assume_tokens_per_s=rate)
    assert not (tmp_path / "r").exists()


def test_real_worker_trains_like_the_sweep_process(tmp_path, monkeypatch):
    """The worker process (python -m torchpeer.experiments.worker) trains the same run as the sweep's own
    process: same tokens, and the same final loss up to the thread count's summation order. One PEER
    run (the family with more state); several workers at once are the fake-worker tests' subject."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    spec = spec_for(tmp_path, budgets=(1e9,))
    only = "d_model=16-ffw=peer-*"
    par = run_sweep(spec, str(tmp_path / "par"), only=only, parallel=2, progress=False, say=lambda s: None)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # as the workers had
    try:
        seq = run_sweep(spec, str(tmp_path / "seq"), only=only, progress=False, say=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    assert [r["run"] for r in par] == [r["run"] for r in seq] and len(par) == 1
    by = {r["run"]: r for r in seq}
    for r in par:
        s = by[r["run"]]
        assert r["tokens"] == s["tokens"] > 0
        assert r["valid"]["small"]["loss"] == pytest.approx(s["valid"]["small"]["loss"], rel=1e-4)
    with open(tmp_path / "par" / par[0]["run"] / "sweep_run.json") as fh:
        assert json.load(fh)["run"] == par[0]["run"]


TINY_SPEC = """
[sweep]
base = "ptb-tiny"
kind = "isoflop"
budgets = [1e8]

[base]
"train.device" = "cpu"
"train.batch_size" = 4
"train.warmup_steps" = 1
"train.ckpt_interval" = 4
"train.tensorboard" = false
"train.eval_batches" = 2
"model.seq_len" = 32
"model.n_layers" = 1
"model.n_heads" = 2
"data.tokenizer" = "byte"
"data.train" = "{text}"
"data.valid.small" = "{text}"
"data.valid.ptb" = "none"           # the base's PTB valid set: 400k tokens to evaluate, not under test

[grid.size]
d16 = {{ "model.d_model" = 16, "model.ffw" = "dense" }}
"""


def test_device_sweep_script_runs_a_sweep_and_packs_its_results(tmp_path):
    """scripts/device_sweep.sh (the GPU job wrapper) on the CPU: the sweep runs, and $OUT gets its log and
    the runs folder as a tarball without checkpoints; a missing argument is exit 2. (A tiny spec of one
    dense run that writes checkpoints: the script, not the training, is under test.)"""
    import subprocess
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "scripts", "device_sweep.sh")
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 400)
    spec = tmp_path / "tiny.toml"
    spec.write_text(TINY_SPEC.format(text=tmp_path / "text.txt"))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    assert subprocess.run(["bash", script, str(spec)], env=env, capture_output=True).returncode == 2
    res = subprocess.run(
        ["bash", script, str(spec), "runs/smoke"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": root},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (run,) = [r["run"] for r in map(json.loads, (tmp_path / "runs" / "smoke" / "results.jsonl").open())]
    assert f"{run}: finished" in (out / "sweep_smoke.log").read_text()
    assert os.listdir(tmp_path / "runs" / "smoke" / run / "checkpoints")  # there were checkpoints to leave out
    with tarfile.open(out / "smoke.tgz") as tar:
        names = tar.getnames()
    assert "runs/smoke/results.jsonl" in names and f"runs/smoke/{run}/summary.json" in names
    assert not any("checkpoints" in n for n in names)
    # the slim carry: a checkout that has only .carry/smoke/results.jsonl (a runs folder too large to carry)
    # skips the run recorded there, and packs that record back with nothing retrained
    slim = tmp_path / "slim"
    (slim / ".carry" / "smoke").mkdir(parents=True)
    shutil.copyfile(tmp_path / "runs" / "smoke" / "results.jsonl", slim / ".carry" / "smoke" / "results.jsonl")
    res = subprocess.run(
        ["bash", script, str(spec), "runs/smoke"], cwd=slim, env={**env, "PYTHONPATH": root},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "results.jsonl from .carry/smoke (1 runs done)" in res.stdout and f"{run}: done, skipped" in res.stdout
    assert sorted(os.listdir(slim / "runs" / "smoke")) == ["results.jsonl"]
    with tarfile.open(out / "smoke.tgz") as tar:
        assert tar.getnames() == ["runs/smoke", "runs/smoke/results.jsonl"]
    # with a snapshot (.snap/torchpeer + .snap/COMMIT, as the campaign's procedure makes it) the
    # package comes from it and every record names the snapshot's commit
    snap = tmp_path / "snapped"
    (snap / ".snap").mkdir(parents=True)
    os.symlink(os.path.join(root, "torchpeer"), snap / ".snap" / "torchpeer")
    (snap / ".snap" / "COMMIT").write_text("abc1234\n")
    # DEVICE_END (the command's own deadline) and no --stop-at: the stop is derived from it, so that what
    # ran before the sweep in the same command cannot push the stop past the command's limit
    now = int(time.time())
    late = subprocess.run(
        ["bash", script, str(spec), "runs/late"], cwd=snap, env={**env, "DEVICE_END": str(now + 40)},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert late.returncode == 4 and "leaves" in late.stderr and not (snap / "runs" / "late").exists()
    # --stop-at makes the sweep start its run in a worker process, whose intra-op threads are cores //
    # --parallel: --parallel 2 gives it one thread, as the test's own processes have (two threads on two
    # cores shared with other processes took 6.8 s for 16 steps where one took 0.3 s, 2026-12-07)
    res = subprocess.run(
        ["bash", script, str(spec), "runs/smoke", "--parallel", "2"], cwd=snap,
        env={**env, "DEVICE_END": str(now + 600)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "torchpeer from" in res.stdout and ".snap" in res.stdout
    stop = int(res.stdout.split("device_sweep: --stop-at ")[1].split()[0])
    assert 600 - 45 - 60 <= stop <= 600 - 45  # DEVICE_END less the packing margin, less the seconds spent
    (rec,) = [json.loads(line) for line in (snap / "runs" / "smoke" / "results.jsonl").read_text().splitlines()]
    assert rec["code"]["commit"] == "abc1234" and rec["code"]["torch"]


def test_worker_exit_status_for_a_memory_refusal(tmp_path, monkeypatch):
    """The worker exits 75 (start me later) when the step would fit on the empty GPU but not in
    what is free now, and fails (raises: exit 1) when it would not fit even on the empty GPU."""
    import torchpeer.lm as lm
    from torchpeer.experiments import worker
    from torchpeer.lm.memory import MemoryFitError

    spec = spec_for(tmp_path)
    run = plan_sweep(spec, str(tmp_path / "runs"))[0]
    os.makedirs(run.run_dir)
    with open(os.path.join(run.run_dir, worker.RUN_FILE), "w") as fh:
        json.dump({"run": run.name, "config": run.cfg.to_dict()}, fh)
    for capacity, expect in ((100, worker.EXIT_NO_MEMORY_NOW), (50, None), (None, None)):

        def refuse(*a, capacity=capacity, **k):
            raise MemoryFitError("a training step needs about 80 B", needed=80, available=10, capacity=capacity)

        monkeypatch.setattr(lm, "train", refuse)
        if expect is None:
            with pytest.raises(MemoryFitError):
                worker.main([run.run_dir])
        else:
            assert worker.main([run.run_dir]) == expect


def test_check_fits_refusal_carries_the_numbers():
    from torchpeer.lm import load_config
    from torchpeer.lm.memory import MemoryFitError, check_fits

    cfg = load_config("ptb-tiny")
    cfg.train.device = "cpu"
    with pytest.raises(MemoryFitError, match="a training step needs about") as e:
        check_fits(cfg, "cpu", available=1)
    assert e.value.available == 1 and e.value.needed > 1 and e.value.capacity is None
    assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working


def test_device_sweep_script_packs_what_it_has_when_killed_at_the_time_limit(tmp_path):
    """SIGTERM to scripts/device_sweep.sh (the device tool's time limit) lost everything in batch 7: the
    tar came after the sweep. Now the script packs the runs written so far, passes the signal on (the
    run stops with an interrupt checkpoint), packs again and exits 143."""
    import signal
    import subprocess
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 400)
    spec = tmp_path / "long.toml"
    spec.write_text(TINY_SPEC.format(text=tmp_path / "text.txt").replace("budgets = [1e8]", "budgets = [1e11]"))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    p = subprocess.Popen(
        ["bash", os.path.join(root, "scripts", "device_sweep.sh"), str(spec), "runs/sig"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 240
        metrics = []
        while time.time() < deadline and p.poll() is None:
            metrics = list((tmp_path / "runs" / "sig").glob("*/metrics.jsonl"))
            if metrics and len(metrics[0].read_text().splitlines()) >= 3:  # the run is training
                break
            time.sleep(0.2)
        assert p.poll() is None and metrics, "the run did not start training"
        p.send_signal(signal.SIGTERM)  # to the script only, as a time limit's kill of its process
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 143, err
    assert "device_sweep: signal TERM: packing what the runs have written so far" in err
    run = metrics[0].parent.name
    with tarfile.open(out / "sig.tgz") as tar:
        packed = tar.extractfile(f"runs/sig/{run}/metrics.jsonl").read().decode()
        assert not any("checkpoints" in n for n in tar.getnames())
    events = [json.loads(line).get("event") for line in packed.splitlines()]
    assert "interrupted" in events  # the sweep got the signal and its run stopped with a checkpoint
    assert os.listdir(tmp_path / "runs" / "sig" / run / "checkpoints")


def test_worker_threads_are_the_cores_share_or_the_callers_lower_cap(monkeypatch):
    """Each worker gets cores // parallel intra-op threads, unless the caller's OMP_NUM_THREADS is
    lower (it used to be overridden: a sweep in a one-thread test process ran its workers on every
    core); a bad value is ignored."""
    monkeypatch.setattr(pool_mod.os, "cpu_count", lambda: 16)
    cases = (("", 4, "4"), ("1", 4, "1"), ("8", 4, "4"), ("2", 1, "2"), ("x", 2, "8"), ("0", 2, "8"))
    for asked, parallel, want in cases:
        monkeypatch.setenv("OMP_NUM_THREADS", asked)
        env = pool_mod.worker_env(parallel)
        assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == want, (asked, parallel)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert pool_mod.worker_env(3)["OMP_NUM_THREADS"] == "5"


def test_longest_first_starts_fresh_runs_by_estimate_longest_and_unknown_first(tmp_path, fake_worker, monkeypatch):
    """--longest-first: the runs start by estimated seconds, unknown first, then longest to shortest
    (without it: plan order); the CLI's continue line keeps the flag."""
    from torchpeer.experiments import runner as runner_mod
    from torchpeer.experiments.sweep_command import continue_command

    monkeypatch.setenv("SLEEP", "0.05")
    spec = spec_for(tmp_path, budgets=(1e10,))
    names = [r.name for r in plan_sweep(spec, str(tmp_path / "plan"))]
    seconds = dict(zip(names, (5.0, None, 50.0, 20.0)))
    monkeypatch.setattr(runner_mod, "estimate_seconds", lambda run, records, assume=None: seconds[run.name])
    for longest_first, want in ((False, names), (True, [names[1], names[2], names[3], names[0]])):
        runs_dir = str(tmp_path / f"runs-{longest_first}")
        quiet = dict(progress=False, say=lambda m: None)
        run_sweep(spec, runs_dir, parallel=1, stop_at=600, longest_first=longest_first, **quiet)
        started = [name for name, _, _ in sorted(intervals(runs_dir), key=lambda span: span[1])]
        assert started == want, longest_first
    args = type("Args", (), dict(spec="s", only=None, time_limit=None, assume_tokens_per_s=None, stop_at=None))()
    args.parallel, args.drop_checkpoints, args.no_progress, args.longest_first = 4, True, False, True
    assert continue_command(args, "runs/s").endswith("--parallel 4 --drop-checkpoints --longest-first")
