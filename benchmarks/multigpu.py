"""Multi-GPU measurement (issue 11): W GPUs vs 1, memory per rank, communication time vs bytes,
loss-curve match, and a W -> 1 resume of a sharded checkpoint.

    python benchmarks/multigpu.py --config gpu-peer-small --worlds 1 2 --steps 60 \\
        -- --data.train '.corpus/*/train.jsonl.xz' --data.valid.corpus '.corpus/*/valid.jsonl.xz'

Runs (each in its own processes; everything after ``--`` is passed to every run as config
overrides):

1. ``plain``: one process without torchrun (the one-GPU reference; also prepares the token cache);
2. for each W in --worlds: ``torchrun --standalone --nproc_per_node W`` (W = 1 is the NCCL path
   with one rank: the smoke test; it is run twice, as shipped (one process: tables not sharded,
   fused kernels) and with the sharded code path forced), DCP checkpoints at step --steps/2 and
   at the end;
3. for the largest W > 1 (else W = 1): resume its step --steps/2 checkpoint in one plain process
   and compare the losses of the remaining steps;
4. for each W > 1: time the collectives of one step at the config's sizes (CUDA events, median)
   and compare with the byte count of torchpeer.parallel.comm.

Reported: median tokens/s (steady log intervals), peak memory per rank, expert parameters per
rank, per-step loss differences against ``plain``, final validation loss, communication ms and
GB/s per collective. Writes <out-dir>/multigpu_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for peer_layer.time_ms


# ------------------------------------------------------------------------------------ workers


def _config(args):
    from torchpeer.lm.config_io import load_config

    pairs = [(k.lstrip("-"), v) for k, v in zip(args.overrides[::2], args.overrides[1::2])]
    return load_config(args.config, pairs)


def worker_train(args) -> None:
    """One training run in this process (plain) or as one torchrun rank."""
    import torch

    from torchpeer.lm.trainer import Trainer

    cfg = _config(args)
    plan = None
    if args.shard_experts != "auto":
        from torchpeer.parallel import DistributedPlan

        plan = DistributedPlan(shard_experts=args.shard_experts)
    trainer = Trainer(cfg, args.run_dir, resume=args.resume, progress=False, plan=plan)
    trainer.build()
    plan = trainer.plan
    tables = {"PEER": ("down", "up"), "PKM": ("values",)}
    expert = sum(
        getattr(m, t).numel() for m in trainer.model.modules() for t in tables.get(type(m).__name__, ())
    )  # this rank's (column shards when sharded)
    trainer.fit()
    mem = {"rank": plan.rank, "world_size": plan.world_size, "expert_params_this_rank": expert}
    if trainer.device.type == "cuda":
        mem["max_allocated_gib"] = round(torch.cuda.max_memory_allocated(trainer.device) / 2**30, 3)
        mem["max_reserved_gib"] = round(torch.cuda.max_memory_reserved(trainer.device) / 2**30, 3)
    else:
        import resource

        mem["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    with open(os.path.join(args.run_dir, f"memory_rank{plan.rank}.json"), "w") as fh:
        json.dump(mem, fh)


def _timed(fn, device, reps: int = 20) -> float:
    """Median milliseconds of fn() (CUDA events on GPUs), after aligning the ranks."""
    import torch.distributed as dist
    from peer_layer import time_ms  # benchmarks/peer_layer.py (this folder is on sys.path when run)

    dist.barrier()
    return time_ms(fn, device, warmup=3, reps=reps)


def worker_comm(args) -> None:
    """Time one step's collectives at the config's sizes (run under torchrun)."""
    import torch
    import torch.distributed as dist

    from torchpeer.lm.runtime import resolve_device
    from torchpeer.parallel.collectives import ShardContext, all_gather_tokens, columns_to_tokens, tokens_to_columns
    from torchpeer.parallel.comm import communication_per_step
    from torchpeer.parallel.runtime import init_distributed

    cfg = _config(args)
    cfg.model.vocab_size = cfg.model.vocab_size or 16384
    env = init_distributed(resolve_device(cfg.train.device))
    W, dev = env.world_size, env.device
    T = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len
    report = communication_per_step(cfg.model, T, W, act_bytes=2 if dev.type == "cuda" else 4)
    act = torch.bfloat16 if dev.type == "cuda" else torch.float32
    ctx = ShardContext(dist.group.WORLD, env.rank, W)
    d = cfg.model.d_model
    out = {"world_size": W, "tokens_per_step": T, "bytes": report, "ms": {}}
    x = torch.randn(T // W, d, device=dev, dtype=act)
    y_cols = torch.randn(T, d // W, device=dev, dtype=act)
    out["ms"]["all_gather_x"] = _timed(lambda: all_gather_tokens(x, ctx), dev)
    out["ms"]["all_to_all_y"] = _timed(lambda: columns_to_tokens(y_cols, ctx), dev)
    out["ms"]["all_to_all_dy"] = _timed(lambda: tokens_to_columns(x, ctx), dev)
    if report["layers"] and report["layers"][0]["kind"] == "PEER":
        dots = torch.randn(T, cfg.model.peer.heads * cfg.model.peer.top_k, device=dev, dtype=torch.float32)
        out["ms"]["all_reduce_dots"] = _timed(lambda: dist.all_reduce(dots), dev)
    grads = torch.randn(int(report["dense_params"]), device=dev, dtype=torch.float32)
    out["ms"]["ddp_all_reduce_dense"] = _timed(lambda: dist.all_reduce(grads), dev, reps=10)
    if env.rank == 0:
        with open(args.out_json, "w") as fh:
            json.dump(out, fh)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------ driver


def _launch(cmd: list[str], log: str) -> None:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "TQDM_DISABLE": "1"}
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        with open(log) as fh:
            tail = fh.read()[-4000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log {log}:\n{tail}")


def _torchrun(world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]


def _read(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    losses = {r["step"]: r["loss"] for r in recs if "loss" in r}
    rates = [r["tok_per_s"] for r in recs if "tok_per_s" in r]
    steady = rates[2:] if len(rates) > 3 else rates  # the first intervals include compilation/warm-up
    mem = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(run_dir, "memory_rank*.json")))]
    valid = {k: v["loss"] for k, v in summary["valid"].items()}
    return {
        "world_size": summary.get("world_size"),
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "tokens_per_s": round(statistics.median(steady), 1) if steady else None,
        "valid_loss": valid,
        "memory": mem,
        "losses": losses,
    }


def _max_rel(a: dict, b: dict, steps=None) -> float | None:
    keys = [s for s in a if s in b and (steps is None or s in steps)]
    if not keys:
        return None
    return max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in keys)


def markdown(res: dict) -> str:
    lines = [
        f"# Multi-GPU: {res['config']}, {res['steps']} steps ({res['date']})",
        "",
        f"{res['device']}; torch {res['torch']}, triton {res['triton']}. Command: `{res['command']}`",
        "",
        "| run | W | tokens/s | speed-up vs plain | max rel. loss diff vs plain | final valid loss "
        "| peak memory per rank (GiB) | expert params per rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = res["runs"]["plain"]["tokens_per_s"]
    for name, r in res["runs"].items():
        mem = ", ".join(str(m.get("max_allocated_gib", m.get("max_rss_gib"))) for m in r["memory"])
        experts = ", ".join(f"{m['expert_params_this_rank']:,}" for m in r["memory"])
        speed = f"{r['tokens_per_s'] / base:.2f}x" if base and r["tokens_per_s"] else ""
        diff = r.get("max_rel_loss_diff_vs_plain")
        lines.append(
            f"| {name} | {r['world_size']} | {r['tokens_per_s']:,} | {speed} | "
            f"{'' if diff is None else f'{diff:.2e}'} | {r['valid_loss']} | {mem} | {experts} |"
        )
    if res.get("resume"):
        rs = res["resume"]
        lines += [
            "",
            f"Resume: {rs['from']} checkpoint at step {rs['at_step']} continued in one plain process: "
            f"max rel. loss diff over steps {rs['at_step'] + 1}..{res['steps']} = {rs['max_rel_loss_diff']:.2e}; "
            f"final valid loss {rs['valid_loss']} (W run: {rs['reference_valid_loss']}).",
        ]
    for w, c in res.get("comm", {}).items():
        lines += [
            "",
            f"Communication, W = {w} (median ms per collective at one step's sizes; bytes from "
            "torchpeer.parallel.comm, per rank sent):",
            "",
            "| collective | ms | MB sent | GB/s |",
            "|---|---|---|---|",
        ]
        layer = c["bytes"]["layers"][0]["columns"] if c["bytes"]["layers"] else {}
        sizes = {
            "all_gather_x": layer.get("all_gather_x"),
            "all_to_all_y": layer.get("all_to_all_y_dy_dx", 0) / 3 if layer else None,
            "all_to_all_dy": layer.get("all_to_all_y_dy_dx", 0) / 3 if layer else None,
            "all_reduce_dots": layer.get("all_reduce_dots", 0) / 2 if layer else None,
            "ddp_all_reduce_dense": c["bytes"]["ddp_all_reduce"],
        }
        for k, ms in c["ms"].items():
            b = sizes.get(k)
            gbs = f"{b / (ms * 1e-3) / 1e9:.1f}" if b and ms else ""
            lines.append(f"| {k} | {ms:.3f} | {'' if b is None else f'{b / 1e6:.3f}'} | {gbs} |")
        # one step = per expert layer: gather x, all-to-all y / dy / dx, two dot all-reduces; + DDP
        ms = c["ms"]
        n_layers = len(c["bytes"]["layers"])
        layer_ms = ms.get("all_gather_x", 0) + ms.get("all_to_all_y", 0) + 2 * ms.get("all_to_all_dy", 0)
        layer_ms += 2 * ms.get("all_reduce_dots", 0)
        total = n_layers * layer_ms + ms.get("ddp_all_reduce_dense", 0)
        lines.append(
            f"| **one step** ({n_layers} expert layer(s) + DDP, not overlapped) | {total:.3f} | "
            f"{c['bytes']['total_columns'] / 1e6:.3f} | |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_train", "_comm"):
        ap = argparse.ArgumentParser()
        ap.add_argument("mode")
        ap.add_argument("--config", required=True)
        ap.add_argument("--run-dir")
        ap.add_argument("--resume", action="store_true")
        ap.add_argument("--out-json")
        ap.add_argument("--shard-experts", default="auto")
        cut = argv.index("--") if "--" in argv else len(argv)
        args = ap.parse_args(argv[:cut])
        args.overrides = argv[cut + 1 :]
        (worker_train if args.mode == "_train" else worker_comm)(args)
        return 0

    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    else:
        extra = []
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="gpu-peer-small")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--work-dir", default="runs/multigpu")
    ap.add_argument("--name", default=None, help="result file stem (default multigpu_<date>)")
    args = ap.parse_args(argv)

    import torch

    half = max(1, args.steps // 2)
    overrides = [
        "--train.max_steps",
        str(args.steps),
        "--train.ckpt_interval",
        str(half),
        "--train.keep_checkpoints",
        "2",
        "--train.log_interval",
        "1",
        "--train.eval_interval",
        str(args.steps + 1),
        "--train.tensorboard",
        "false",
        *extra,
    ]
    os.makedirs(args.work_dir, exist_ok=True)
    me = os.path.abspath(__file__)

    wmax = max(args.worlds)

    def train_cmd(run_dir, world=None, resume=False, shard="auto", checkpoint=False):
        # Checkpoints (a 1M-expert model's is ~13 GB with its moments) only where the resume needs them.
        head = [sys.executable] if world is None else _torchrun(world)
        cmd = [*head, me, "_train", "--config", args.config, "--run-dir", run_dir, "--shard-experts", shard]
        ckpt = ["--train.checkpoint", "true" if checkpoint else "false"]
        return cmd + (["--resume"] if resume else []) + ["--", *overrides, *ckpt]

    runs = {}
    t0 = time.time()
    plain = os.path.join(args.work_dir, "plain")
    shutil.rmtree(plain, ignore_errors=True)
    _launch(train_cmd(plain), plain + ".log")
    runs["plain"] = _read(plain)
    for w in args.worlds:
        rd = os.path.join(args.work_dir, f"w{w}")
        shutil.rmtree(rd, ignore_errors=True)
        _launch(train_cmd(rd, w, checkpoint=w == wmax), rd + ".log")
        runs[f"torchrun W={w}"] = r = _read(rd)
        r["max_rel_loss_diff_vs_plain"] = _max_rel(r["losses"], runs["plain"]["losses"])
        if w == 1:  # one process keeps the fused kernels; also run the sharded code path on one device
            rd = os.path.join(args.work_dir, "w1_sharded")
            shutil.rmtree(rd, ignore_errors=True)
            _launch(train_cmd(rd, 1, shard="always"), rd + ".log")
            runs["torchrun W=1 sharded"] = r = _read(rd)
            r["max_rel_loss_diff_vs_plain"] = _max_rel(r["losses"], runs["plain"]["losses"])

    # W -> 1: the largest W's mid-run checkpoint, continued in one plain process (moved, not copied)
    src = os.path.join(args.work_dir, f"w{wmax}")
    dst = os.path.join(args.work_dir, f"w{wmax}_resumed_on_1")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "summary.json"))
    os.makedirs(os.path.join(dst, "checkpoints"))
    for ck in glob.glob(os.path.join(src, "checkpoints", "step_*")):
        if int(ck.rsplit("_", 1)[1]) == half:
            shutil.move(ck, os.path.join(dst, "checkpoints", os.path.basename(ck)))
        else:
            shutil.rmtree(ck)
    _launch(train_cmd(dst, None, resume=True, checkpoint=False), dst + ".log")
    resumed = _read(dst)
    ref = runs[f"torchrun W={wmax}"]
    resume = {
        "from": f"W={wmax}",
        "at_step": half,
        "max_rel_loss_diff": _max_rel(resumed["losses"], ref["losses"], steps=range(half + 1, args.steps + 1)),
        "valid_loss": resumed["valid_loss"],
        "reference_valid_loss": ref["valid_loss"],
    }

    comm = {}
    for w in args.worlds:
        if w > 1:
            out_json = os.path.join(args.work_dir, f"comm_w{w}.json")
            cmd = [*_torchrun(w), me, "_comm", "--config", args.config, "--out-json", out_json, "--", *overrides]
            _launch(cmd, out_json + ".log")
            with open(out_json) as fh:
                comm[w] = json.load(fh)

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    date = datetime.date.today().isoformat()
    res = {
        "date": date,
        "device": f"{torch.cuda.device_count()} x {device}" if torch.cuda.is_available() else device,
        "torch": torch.__version__,
        "triton": triton_version,
        "config": args.config,
        "steps": args.steps,
        "command": shlex.join(["python", "benchmarks/multigpu.py", *sys.argv[1:]]),
        "runs": runs,
        "resume": resume,
        "comm": comm,
        "wall_seconds": round(time.time() - t0, 1),
    }
    from torchpeer.data.atomic import write_text_atomic

    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, args.name or f"multigpu_{date}")
    write_text_atomic(stem + ".json", json.dumps(res, indent=2, default=str))
    write_text_atomic(stem + ".md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
