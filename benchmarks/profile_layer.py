"""Where one PEER layer step spends its time: GPU busy vs wall, launches, host syncs, top ops.

The layer benchmark (peer_layer.py) gives one number per shape; at small shapes (4096 tokens) that
number can be the CPU's launch rate rather than the GPU's work. This script runs `--steps`
forward+backward steps of one implementation under torch.profiler and reports, per step:

  wall_ms        host wall time of a step, synchronised at its end (what training feels)
  gpu_ms         the sum of the step's kernel durations (GPU busy time; 0 on the CPU)
  busy           gpu_ms / wall_ms: near 1 = GPU-bound, low = launch- or sync-bound
  launches       CUDA kernel launches (cudaLaunchKernel / cuLaunchKernel / Triton's launcher)
  syncs          host syncs: device-to-host scalar reads (aten::_local_scalar_dense: .item(),
                 int(t), bool(t)) and explicit stream/device/event synchronisations
  top kernels    by GPU time; top host ops by self CPU time (where the launch time goes)

    python benchmarks/profile_layer.py --tokens 4096 --out-dir $OUT           # the 4096-token case
    python benchmarks/profile_layer.py --impl triton-refnorm --tokens 4096,65536 --out-dir $OUT
    python benchmarks/profile_layer.py --quick --out-dir /tmp/p               # CPU smoke test

Writes <out-dir>/profile_layer_<date>.json and .md (with the date, GPU, versions and commit).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from peer_layer import commit_of, make_module, run_info  # noqa: E402

from torchpeer.data.atomic import write_text_atomic  # noqa: E402

IMPLS = ("triton", "triton-refnorm", "torch", "dense4d")
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
SYNC_NAMES = (
    "aten::_local_scalar_dense",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
)
TOP = 12


def _self_device_us(evt) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, name, None)
        if v is not None:
            return float(v)
    return 0.0


def _is_kernel(evt) -> bool:
    """A GPU-side activity (kernel or memcpy/memset on the device), not a host op."""
    kind = getattr(evt, "device_type", None)
    return kind is not None and kind != torch.autograd.DeviceType.CPU


def summarise(prof, steps: int, wall_ms: float, on_gpu: bool = True) -> dict:
    """The per-step numbers and top tables of one profiled run (see the module docstring)."""
    kernels, host, launches, syncs = {}, {}, 0, {}
    for evt in prof.events():
        if _is_kernel(evt):
            k = kernels.setdefault(evt.name, [0, 0.0])
            k[0] += 1
            k[1] += _self_device_us(evt)
            continue
        if evt.name in LAUNCH_NAMES:
            launches += 1
        if evt.name in SYNC_NAMES:
            syncs[evt.name] = syncs.get(evt.name, 0) + 1
        h = host.setdefault(evt.name, [0, 0.0])
        h[0] += 1
        h[1] += float(getattr(evt, "self_cpu_time_total", 0.0))
    gpu_ms = sum(v[1] for v in kernels.values()) / 1e3 / steps if on_gpu else None
    top_k = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:TOP]
    top_h = sorted(host.items(), key=lambda kv: -kv[1][1])[:TOP]
    return {
        "wall_ms": round(wall_ms, 4),
        "gpu_ms": None if gpu_ms is None else round(gpu_ms, 4),
        "busy": round(gpu_ms / wall_ms, 3) if gpu_ms is not None and wall_ms > 0 else None,
        "launches": round(launches / steps, 1),
        "syncs": round(sum(syncs.values()) / steps, 2),
        "sync_kinds": {k: round(v / steps, 2) for k, v in sorted(syncs.items())},
        "top_kernels": [
            {"name": n[:90], "calls": round(c / steps, 1), "ms": round(us / 1e3 / steps, 4)} for n, (c, us) in top_k
        ],
        "top_host": [
            {"name": n[:90], "calls": round(c / steps, 1), "ms": round(us / 1e3 / steps, 4)} for n, (c, us) in top_h
        ],
    }


def profile_one(impl: str, d: int, tokens: int, cfg: dict, device, dtype, steps: int, warmup: int) -> dict:
    """Profile `steps` forward+backward steps of `impl` on (tokens, d) inputs after `warmup` ones."""
    module = make_module(impl, d, cfg).to(device=device, dtype=dtype)  # in the inputs' dtype, as peer_layer.py
    x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(dy)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps  # unprofiled: the profiler adds host time
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    row = {"impl": impl, "d_model": d, "tokens": tokens, "dtype": str(dtype).replace("torch.", "")}
    row.update(summarise(prof, steps, wall_ms, on_gpu=device.type == "cuda"))
    return row


def markdown(result: dict) -> str:
    cfg = result["config"]
    out = [
        f"# PEER layer profile, {result['date']}",
        "",
        f"GPU: {result['gpu']}; torch {result['torch']}; triton {result['triton']}; commit {result['commit']}; "
        f"N {cfg['n_experts']}, h {cfg['heads']}, k {cfg['top_k']}, d_key {cfg['d_key']}; {cfg['steps']} profiled "
        "forward+backward steps after warm-up.",
        "",
        "wall: host time per step (synchronised, unprofiled); gpu: kernel time per step; busy = gpu / wall "
        "(low: launch- or sync-bound); syncs: device-to-host reads and explicit synchronisations per step.",
        "",
        "| impl | d_model | tokens | wall ms | gpu ms | busy | launches | syncs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        out.append(
            f"| {r['impl']} | {r['d_model']} | {r['tokens']} | {r['wall_ms']} | {r['gpu_ms']} | {r['busy']} | "
            f"{r['launches']} | {r['syncs']} |"
        )
    for r in result["rows"]:
        out += ["", f"## {r['impl']}, d {r['d_model']}, {r['tokens']} tokens", ""]
        if r["sync_kinds"]:
            out += ["syncs per step: " + ", ".join(f"{k} {v}" for k, v in r["sync_kinds"].items()), ""]
        for title, key in (("kernels by GPU time", "top_kernels"), ("host ops by self CPU time", "top_host")):
            if not r[key]:
                continue
            out += [f"Top {title} (per step):", "", "| name | calls | ms |", "| --- | ---: | ---: |"]
            out += [f"| `{e['name']}` | {e['calls']} | {e['ms']} |" for e in r[key]]
            out.append("")
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--impl", default="triton", help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--tokens", default="4096", help="comma-separated token counts")
    p.add_argument("--steps", type=int, default=10, help="profiled steps (after --warmup ones)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse here)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, the torch impl on the CPU (smoke test)")
    args = p.parse_args(argv)
    impls = [i.strip() for i in args.impl.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        p.error(f"unknown --impl {bad}; choose from {', '.join(IMPLS)}")
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        p.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = {"n_experts": 1024**2, "heads": 8, "top_k": 16, "d_key": 128}
    dtype = torch.bfloat16
    d = args.d_model
    if args.quick:
        cfg = {"n_experts": 32**2, "heads": 2, "top_k": 4, "d_key": 16}
        d, tokens, dtype = 32, [64], torch.float32
        impls = [i for i in impls if i in ("torch", "dense4d")] or ["torch"]
    if device.type != "cuda" and any(i.startswith("triton") for i in impls):
        p.error("the triton impls need a CUDA device; use --impl torch (or --quick) on the CPU")
    result = {**run_info(device), "commit": commit_of(args.commit), "config": {**cfg, "steps": args.steps}, "rows": []}
    for impl in impls:
        for t in tokens:
            row = profile_one(impl, d, t, cfg, device, dtype, args.steps, args.warmup)
            print(
                f"{impl} d {d} T {t}: wall {row['wall_ms']} ms, gpu {row['gpu_ms']} ms, busy {row['busy']}, "
                f"{row['launches']} launches, {row['syncs']} syncs per step",
                flush=True,
            )
            result["rows"].append(row)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"profile_layer_{result['date']}")
    write_text_atomic(stem + ".json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(stem + ".md", markdown(result))
    print(f"wrote {stem}.json and .md", flush=True)
    return result


if __name__ == "__main__":
    main()
