"""Benchmark + full-size correctness check of the Triton product-key retrieval (torchpeer/ops/retrieval/triton_*.py).

    PYTHONUNBUFFERED=1 python benchmarks/bench_retrieval.py [--out DIR] [--only onepass]
    TRITON_INTERPRET=1 python benchmarks/bench_retrieval.py --smoke    # tiny CPU run of the script's logic

Problem: H = 8 heads, n = 1024 sub-keys per half (N = 1024^2 experts), d_key = 128, top_k = 16, bf16
queries and shared sub-keys. What it does (one GPU call, sections in order of importance, each guarded
so that one failing variant does not stop the others):
  1. correctness at T = 4096: every forward variant against the "merge" kernel (indices equal, score
     difference), the merge kernel against the chunked PyTorch path (product_key_topk_torch), and 32 tokens against
     float64 brute force over all n^2 keys; keys with repeated rows (ties, CAP overflow -> fallback):
     the score multiset of the returned set must equal the merge kernel's; backward variants against an
     fp32 (no TF32) reference;
  2. forward timings at T = 16384, 65536: merge, threshold (its two stages separately too), torch;
  3. backward timings: dense (TF32 matmuls) vs triton (dq gather + one-hot tl.dot dkeys);
  4. launch-config sweeps of the threshold kernel and the dkeys kernel at T = 65536;
  5. forward + backward through autograd, old default (merge + dense) vs new (threshold + triton),
     with the best swept configs;
  6. extras: per-head keys, fp32 queries, top_k = 32, repeated-row keys (fallback cost).
  0. (first; alone with --only onepass, ~2-3 min) the "onepass" forward side by side with "threshold" and
     "merge" in the same run: bit equality with merge at T = 4096 (also per-head keys, fp32, top_k 32,
     repeated rows with the fallback rate), float64 brute force on 32 tokens, forward times at
     T = 16384 / 65536, its launch sweep, and forward+backward through autograd against the default;
     with --profile, then per-kernel GPU times (torch.profiler) of one fwd+bwd of threshold+hybrid,
     onepass+hybrid and onepass+sorted at the largest T. "packed" and "queue" (opt-in forwards) get the
     same check rows (with their exact-path rates) and forward / fwd+bwd rows.
Times: median of CUDA-event timings (triton.testing.do_bench, L2 flushed between reps).
Writes bench_retrieval.json under --out (default: $OUT if set, else benchmarks/results).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from torchpeer.ops.retrieval import (  # noqa: E402
    BACKWARD_IMPLS,
    RetrievalKernelConfig,
    product_key_topk_reference,
    product_key_topk_torch,
)
from torchpeer.ops.retrieval.triton_backward import backward, backward_dense, backward_triton  # noqa: E402
from torchpeer.ops.retrieval.triton_merge import launch_merge  # noqa: E402
from torchpeer.ops.retrieval.triton_onepass import launch_onepass  # noqa: E402
from torchpeer.ops.retrieval.triton_op import forward, forward_impl, product_key_topk_triton  # noqa: E402
from torchpeer.ops.retrieval.triton_packed import launch_packed  # noqa: E402
from torchpeer.ops.retrieval.triton_queue import launch_queue  # noqa: E402
from torchpeer.ops.retrieval.triton_threshold import half_lists, launch_threshold, pair_merge  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
T0 = time.time()
BUDGET_S = 250  # stop starting new sections after this many seconds


def set_budget(seconds):
    global BUDGET_S
    BUDGET_S = seconds


def default_name(q, keys, k):
    """The default config's forward as it resolves for these inputs ("auto=queue", since 2026-12-05 at T >=
    queue_tokens with bf16 inputs and top_k <= 16; "auto=threshold" below): row names say what ran."""
    impl = forward_impl(q, keys, k, CFG)
    return impl if CFG.forward == impl else f"{CFG.forward}={impl}"


def bench_ms(fn, grad_to_none=None):
    """Median ms (CUDA events, L2 flushed); a single wall-clock run on the CPU."""
    if ON_GPU:
        return triton.testing.do_bench(fn, warmup=10, rep=60, grad_to_none=grad_to_none, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


class Run:
    def __init__(self, out_dir, cfg):
        self.path = os.path.join(out_dir, "bench_retrieval.json")
        os.makedirs(out_dir, exist_ok=True)
        self.data = {"config": cfg, "env": env(), "rows": []}
        self.rows = None  # --rows: run only rows whose name holds one of these substrings

    def add(self, section, name, **kw):
        row = {"section": section, "name": name, **kw}
        self.data["rows"].append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def guarded(self, section, name, fn):
        """Run fn() -> dict of results; record an error instead of raising."""
        if self.rows is not None and not any(r in name for r in self.rows):
            return None  # not asked for (--rows): neither run nor recorded
        if time.time() - T0 > BUDGET_S:
            self.add(section, name, skipped="time budget")
            return None
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - a failing variant is a result too
            self.add(section, name, error=f"{type(e).__name__}: {str(e)[:400]}")
            return None
        self.add(section, name, **res)
        return res

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def env():
    e = {"torch": torch.__version__, "triton": triton.__version__}
    if ON_GPU:
        e["gpu"] = torch.cuda.get_device_name()
    return e


def make(T, H, n, dk, dtype=torch.bfloat16, S=1, dup=1, seed=0, hot=False):
    """hot: a collapsed router: sub-key 0 of each half points along the queries' common mean, so it
    is in nearly every row's top-k and in most selections (one table row's list holds most entries)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(T, H, dk, device=DEV, generator=g)
    keys = torch.randn(S, 2, n, dk // 2, device=DEV, generator=g)
    if hot:
        q = 0.3 * q + 1.0
        keys[:, :, 0] = 3.0
    if dup > 1:  # every sub-key row repeated dup times (ties in every half)
        keys = keys[:, :, torch.arange(n, device=DEV) // dup * dup]
    return q.to(dtype), keys.to(dtype)


# The kernel config every call below passes down; with_settings swaps it for a variant.
CFG = RetrievalKernelConfig()


def with_settings(fn, fwd=None, bwd=None, thresh=None, theta=None, dkeys=None, dq=None):
    """Call fn() with CFG temporarily replaced by a variant (None = keep the field)."""
    global CFG
    saved = CFG
    names = {"forward": fwd, "backward": bwd, "threshold_half": thresh, "theta": theta, "dkeys": dkeys, "dq": dq}
    try:
        CFG = dataclasses.replace(CFG, **{k: v for k, v in names.items() if v is not None})
        return fn()
    finally:
        CFG = saved


def with_backward(impl):
    return dataclasses.replace(CFG, backward=impl)


def compare(a, b):
    """Forward results a vs reference b: fraction of equal index rows, max score difference."""
    (sa, ia), (sb, ib) = a, b
    return {
        "idx_equal_frac": (ia == ib).all(-1).float().mean().item(),
        "max_score_diff": (sa.double() - sb.double()).abs().max().item(),
        "sorted_desc": bool((sa[..., :-1] >= sa[..., 1:]).all().item()),
    }


def rel(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_section(run, H, n, dk, K, T):
    """1. Correctness at T tokens (see the module docstring)."""
    q, keys = make(T, H, n, dk)
    ref = launch_merge(q, keys, K, CFG)
    thresh0 = CFG.threshold_half
    variants = {
        "threshold/max": dict(fwd="threshold", theta="max"),
        "threshold/topk": dict(fwd="threshold", theta="topk"),
        "threshold/max/cap32": dict(fwd="threshold", theta="max", thresh=thresh0[:3] + (32,) + thresh0[4:]),
    }
    for name, kw in variants.items():
        run.guarded("check", name, lambda kw=kw: compare(with_settings(lambda: forward(q, keys, K, CFG), **kw), ref))
    run.guarded("check", "torch_product_keys", lambda: compare(product_key_topk_torch(q, keys, K), ref))

    def brute():
        eq, diff = [], []
        for t0 in range(0, 32, 4):
            qq = q[t0 : t0 + 4]
            bs, bi = product_key_topk_reference(qq.double(), keys.double(), K)
            ts, ti = forward(qq, keys, K, CFG)
            eq.append((ti == bi).all(-1).float().mean().item())
            diff.append((ts.double() - bs).abs().max().item())
        return {"idx_equal_frac": min(eq), "max_score_diff": max(diff)}

    run.guarded("check", "default_vs_float64_bruteforce_32_tokens", brute)

    def ties(dup):
        qd, kd = make(T, H, n, dk, dup=dup, seed=1)
        rs, ri = launch_merge(qd, kd, K, CFG)
        ts, ti = launch_threshold(qd, kd, K, CFG)
        _, _, flags = half_lists(qd, kd, K, CFG)
        return {
            "score_sets_close": bool(torch.allclose(ts.sort(-1).values, rs.sort(-1).values, rtol=1e-5, atol=1e-5)),
            "idx_equal_frac": (ti == ri).all(-1).float().mean().item(),
            "distinct": bool((ti.sort(-1).values.diff(dim=-1) > 0).all().item()),
            "fallback_items_frac": flags.float().mean().item(),
        }

    for dup in (2, 4, 64):
        run.guarded("check", f"ties_dup{dup}", lambda dup=dup: ties(dup))

    def per_head():
        qh, kh = make(T, H, n, dk, S=H, seed=2)
        return compare(launch_threshold(qh, kh, K, CFG), launch_merge(qh, kh, K, CFG))

    run.guarded("check", "per_head_keys", per_head)

    def bwd_check():
        qg, kg = make(T, H, n, dk, seed=3)
        _, idx = launch_threshold(qg, kg, K, CFG)
        ds = torch.randn(idx.shape, device=DEV)
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            dq0, dk0 = backward_dense(ds, qg.float(), kg.float(), idx, True, True, CFG)  # fp32 reference
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        out = {}
        for impl in BACKWARD_IMPLS:
            dq, dkk = backward(ds, qg, kg, idx, True, True, with_backward(impl))
            out[f"{impl}_dq_rel"] = rel(dq, dq0)
            out[f"{impl}_dk_rel"] = rel(dkk, dk0)
        dq, dkk = backward(ds, qg.float(), kg.float(), idx, True, True, with_backward("triton"))
        out["triton_fp32_dq_rel"], out["triton_fp32_dk_rel"] = rel(dq, dq0), rel(dkk, dk0)
        kh = make(T, H, n, dk, S=H, seed=4)[1]
        a = backward(ds, qg.float(), kh.float(), idx, True, True, with_backward("triton"))
        b = backward_dense(ds, qg.float(), kh.float(), idx, True, True, CFG)
        out["per_head_dq_rel"], out["per_head_dk_rel"] = rel(a[0], b[0]), rel(a[1], b[1])
        return out

    run.guarded("check", "backward", bwd_check)


def forward_section(run, H, n, dk, K, T):
    """2. Forward timings at T tokens."""
    q, keys = make(T, H, n, dk)
    run.guarded("fwd", f"merge T={T}", lambda: {"ms": bench_ms(lambda: launch_merge(q, keys, K, CFG)), "T": T})
    for theta in ("max", "topk"):
        run.guarded(
            "fwd",
            f"threshold/{theta} T={T}",
            lambda theta=theta: {
                "ms": with_settings(lambda: bench_ms(lambda: launch_threshold(q, keys, K, CFG)), theta=theta),
                "T": T,
            },
        )

    def stages():
        top_s, top_i, _ = half_lists(q, keys, K, CFG)
        return {
            "half_lists_ms": bench_ms(lambda: half_lists(q, keys, K, CFG)),
            "pair_merge_ms": bench_ms(lambda: pair_merge(top_s, top_i, T, H, n, K, CFG)),
            "T": T,
        }

    run.guarded("fwd", f"threshold stages T={T}", stages)

    def torch_path():
        with torch.no_grad():
            return {"ms": bench_ms(lambda: product_key_topk_torch(q, keys, K)), "T": T}

    run.guarded("fwd", f"torch product_keys T={T}", torch_path)

    def gemm_topk():  # per-half bf16 GEMM + torch.topk only (no pair stage): an optimistic torch floor
        chunk = 8192
        C1, C2 = keys[0, 0], keys[0, 1]

        def f():
            for t0 in range(0, T, chunk):
                qq = q[t0 : t0 + chunk].reshape(-1, dk)
                (qq[:, : dk // 2] @ C1.t()).topk(K, dim=-1)
                (qq[:, dk // 2 :] @ C2.t()).topk(K, dim=-1)

        return {"ms": bench_ms(f), "T": T}

    run.guarded("fwd", f"torch gemm+topk halves only T={T}", gemm_topk)


def backward_section(run, H, n, dk, K, T):
    """3. Backward timings at T tokens."""
    q, keys = make(T, H, n, dk)
    _, idx = launch_threshold(q, keys, K, CFG)
    ds = torch.randn(idx.shape, device=DEV)
    for impl in BACKWARD_IMPLS:
        run.guarded(
            "bwd",
            f"{impl} T={T}",
            lambda impl=impl: {
                "ms": bench_ms(lambda: backward(ds, q, keys, idx, True, True, with_backward(impl))),
                "T": T,
            },
        )
    for what, nq, nk in (("dq", True, False), ("dkeys", False, True)):
        run.guarded(
            "bwd",
            f"triton {what} only T={T}",
            lambda nq=nq, nk=nk: {"ms": bench_ms(lambda: backward_triton(ds, q, keys, idx, nq, nk, CFG)), "T": T},
        )


def best_of(run, section, configs, timed, setting):
    """Time timed() under each config (with_settings(**{setting: cfg})); return (best cfg, ms)."""
    best, best_ms = None, float("inf")
    for cfg in configs:
        res = run.guarded(section, str(cfg), lambda cfg=cfg: {"ms": with_settings(timed, **{setting: cfg}), "cfg": cfg})
        if res and res["ms"] < best_ms:
            best, best_ms = cfg, res["ms"]
    run.add(section, "best", cfg=best, ms=best_ms)
    return best


def sweep_section(run, H, n, dk, K, T, sweep_thresh, sweep_dkeys, sweep_dq):
    """4. Launch-config sweeps at T tokens; returns the best settings for with_settings."""
    q, keys = make(T, H, n, dk)
    best = {}
    for theta, configs in (("max", sweep_thresh), ("topk", sweep_thresh[:3])):
        cfg = best_of(
            run,
            f"sweep_thresh_{theta}",
            configs,
            lambda theta=theta: with_settings(lambda: bench_ms(lambda: launch_threshold(q, keys, K, CFG)), theta=theta),
            "thresh",
        )
        ms = run.data["rows"][-1]["ms"]
        if cfg is not None and ms < best.get("_ms", float("inf")):
            best.update(thresh=cfg, theta=theta, _ms=ms)
    _, idx = launch_threshold(q, keys, K, CFG)
    ds = torch.randn(idx.shape, device=DEV)
    best["dkeys"] = best_of(
        run,
        "sweep_dkeys",
        sweep_dkeys,
        lambda: bench_ms(lambda: backward_triton(ds, q, keys, idx, False, True, CFG)),
        "dkeys",
    )
    best["dq"] = best_of(
        run, "sweep_dq", sweep_dq, lambda: bench_ms(lambda: backward_triton(ds, q, keys, idx, True, False, CFG)), "dq"
    )
    best.pop("_ms", None)
    run.add("sweep", "best settings", **{k: v for k, v in best.items()})
    return {k: v for k, v in best.items() if v is not None}


def fwd_bwd_section(run, H, n, dk, K, T, best):
    """5. Forward + backward through autograd: old default vs new with the best settings."""
    q, keys = make(T, H, n, dk)
    q.requires_grad_()
    keys.requires_grad_()
    up = torch.randn(T, H, K, device=DEV)

    def step():
        s, _ = product_key_topk_triton(q, keys, K, CFG)
        (s * up).sum().backward()

    # (named by what runs: "threshold+triton" was the default when this section was written, not now)
    combos = {"threshold+triton best" if best else "threshold+triton": dict(fwd="threshold", bwd="triton", **best)}
    if not best:  # the old default, once
        combos["old merge+dense"] = dict(fwd="merge", bwd="dense")
    for name, kw in combos.items():
        run.guarded(
            "fwd_bwd",
            f"{name} T={T}",
            lambda kw=kw: {"ms": with_settings(lambda: bench_ms(step, grad_to_none=[q, keys]), **kw), "T": T},
        )


def extra_section(run, H, n, dk, K, T, best):
    """6. Other shapes and dtypes at T tokens: merge vs threshold, timings and agreement."""
    fwd_best = {k: v for k, v in best.items() if k in ("thresh", "theta")}

    def timed(make_kw, k=K):
        qx, kx = make(T, H, n, dk, **make_kw)
        res = {"merge_ms": bench_ms(lambda: launch_merge(qx, kx, k, CFG))}
        res["threshold_ms"] = with_settings(lambda: bench_ms(lambda: launch_threshold(qx, kx, k, CFG)), **fwd_best)
        res.update(compare(launch_threshold(qx, kx, k, CFG), launch_merge(qx, kx, k, CFG)))
        if make_kw.get("dup"):
            res["fallback_items_frac"] = half_lists(qx, kx, k, CFG)[2].float().mean().item()
        return res

    run.guarded("extra", f"per-head keys T={T}", lambda: timed(dict(S=H)))
    run.guarded("extra", f"fp32 queries+keys T={T}", lambda: timed(dict(dtype=torch.float32)))
    run.guarded("extra", f"top_k={2 * K} T={T}", lambda: timed({}, k=2 * K))
    run.guarded("extra", f"dup4 keys (fallback) T={T}", lambda: timed(dict(dup=4)))


def onepass_section(run, H, n, dk, K, T_check, T_list, sweep, quick=False, timings_first=False):
    """0. The "onepass" forward against "threshold" and "merge", all in this one run. quick: only the
    checks, the bf16 forwards and the fwd+bwd rows (no fp32 / top_k rows, no launch sweep).
    timings_first: the timing rows before the checks (the checks compile every variant's kernels,
    which took all of a 75 s budget on an H100: 2026-12-05)."""
    onepass = dataclasses.replace(CFG, forward="onepass")
    q, keys = make(T_check, H, n, dk)
    ref = launch_merge(q, keys, K, CFG)

    def exact(res, want):
        out = compare(res, want)
        out["bit_equal"] = bool(torch.equal(res[0], want[0]) and torch.equal(res[1], want[1]))
        return out

    packed = dataclasses.replace(CFG, forward="packed")
    queue = dataclasses.replace(CFG, forward="queue")

    def checks():
        """Bit-equality of every forward against merge/threshold at T_check, and their fallback rates."""
        run.guarded("onepass", "check vs merge", lambda: exact(launch_onepass(q, keys, K, onepass), ref))
        run.guarded(
            "onepass", "check dot prefix vs merge",
            lambda: exact(launch_onepass(q, keys, K, dataclasses.replace(onepass, onepass_prefix="dot")), ref),
        )  # fmt: skip
        run.guarded(
            "onepass",
            "check vs threshold",
            lambda: exact(
                launch_onepass(q, keys, K, onepass), forward(q, keys, K, dataclasses.replace(CFG, forward="threshold"))
            ),
        )

        def brute():
            eq, diff = [], []
            for t0 in range(0, 32, 4):
                bs, bi = product_key_topk_reference(q[t0 : t0 + 4].double(), keys.double(), K)
                ts, ti = launch_onepass(q[t0 : t0 + 4], keys, K, onepass)
                eq.append((ti == bi).all(-1).float().mean().item())
                diff.append((ts.double() - bs).abs().max().item())
            return {"idx_equal_frac": min(eq), "max_score_diff": max(diff)}

        run.guarded("onepass", "vs float64 brute force, 32 tokens", brute)

        def variant(make_kw, k=K):
            qx, kx = make(T_check, H, n, dk, **make_kw)
            s, i, flags = launch_onepass(qx, kx, k, onepass, return_flags=True)
            out = exact((s, i), launch_merge(qx, kx, k, CFG))
            out["fallback_halves_frac"] = flags.float().mean().item() / 2
            return out

        run.guarded("onepass", "check gaussian keys (fallback rate)", lambda: variant({}))
        run.guarded("onepass", "check per-head keys", lambda: variant(dict(S=H, seed=2)))
        run.guarded("onepass", "check fp32", lambda: variant(dict(dtype=torch.float32, seed=3)))
        run.guarded("onepass", f"check top_k={2 * K}", lambda: variant(dict(seed=4), k=2 * K))
        for dup in (2, 4):
            run.guarded("onepass", f"check dup{dup} keys", lambda dup=dup: variant(dict(dup=dup, seed=1)))

        # "packed" (triton_packed.py): bit_equal against merge and threshold; flags = overflowed halves
        # + 4 * halves whose 32-bit rounds were ambiguous (redone on int64 keys)

        def packed_variant(make_kw, k=K):
            qx, kx = make(T_check, H, n, dk, **make_kw)
            s, i, flags = launch_packed(qx, kx, k, packed, return_flags=True)
            out = exact((s, i), launch_merge(qx, kx, k, CFG))
            threshold = forward(qx, kx, k, dataclasses.replace(CFG, forward="threshold"))
            out["bit_equal_threshold"] = exact((s, i), threshold)["bit_equal"]
            out["fallback_halves_frac"] = (flags % 4).float().mean().item() / 2
            out["exact_rounds_halves_frac"] = (flags // 4).float().mean().item() / 2
            return out

        run.guarded("onepass", "check packed gaussian keys (fallback, exact-round rates)", lambda: packed_variant({}))
        run.guarded("onepass", "check packed per-head keys", lambda: packed_variant(dict(S=H, seed=2)))
        run.guarded("onepass", "check packed fp32", lambda: packed_variant(dict(dtype=torch.float32, seed=3)))
        run.guarded("onepass", f"check packed top_k={2 * K}", lambda: packed_variant(dict(seed=4), k=2 * K))
        run.guarded("onepass", "check packed dup4 keys", lambda: packed_variant(dict(dup=4, seed=1)))

        # "queue" (triton_queue.py): flags = exact-path halves that overflowed CAP + 4 * halves redone exactly

        def queue_variant(make_kw, k=K, cfg=queue):
            qx, kx = make(T_check, H, n, dk, **make_kw)
            s, i, flags = launch_queue(qx, kx, k, cfg, return_flags=True)
            out = exact((s, i), launch_merge(qx, kx, k, CFG))
            threshold = forward(qx, kx, k, dataclasses.replace(CFG, forward="threshold"))
            out["bit_equal_threshold"] = exact((s, i), threshold)["bit_equal"]
            out["exact_path_halves_frac"] = (flags // 4).float().mean().item() / 2
            out["fallback_halves_frac"] = (flags % 4).float().mean().item() / 2
            return out

        run.guarded("onepass", "check queue gaussian keys (exact-path rate)", lambda: queue_variant({}))
        run.guarded(
            "onepass", "check queue D3 gaussian keys (exact-path rate)",
            lambda: queue_variant({}, cfg=dataclasses.replace(queue, queue_depth=3)),
        )  # fmt: skip
        run.guarded("onepass", "check queue per-head keys", lambda: queue_variant(dict(S=H, seed=2)))
        run.guarded("onepass", "check queue fp32", lambda: queue_variant(dict(dtype=torch.float32, seed=3)))
        run.guarded("onepass", f"check queue top_k={2 * K}", lambda: queue_variant(dict(seed=4), k=2 * K))
        run.guarded("onepass", "check queue dup4 keys", lambda: queue_variant(dict(dup=4, seed=1)))

    def timings():
        """Forward rows per implementation and T, fwd+bwd rows, the collapsed-router rows."""
        impls = {
            "threshold": dataclasses.replace(CFG, forward="threshold"),
            "merge": dataclasses.replace(CFG, forward="merge"),
            "onepass": onepass,
            "onepass/dot": dataclasses.replace(onepass, onepass_prefix="dot"),
            "packed": packed,
            "queue": queue,
            "queue/D3": dataclasses.replace(queue, queue_depth=3),
        }
        for T in T_list:
            qt, kt = make(T, H, n, dk)
            for name, cfg in {f"default ({default_name(qt, kt, K)})": CFG, **impls}.items():
                run.guarded(
                    "onepass",
                    f"fwd {name} T={T}",
                    lambda cfg=cfg, qt=qt, kt=kt, T=T: {"ms": bench_ms(lambda: forward(qt, kt, K, cfg)), "T": T},
                )
        if not quick:
            # fp32 inputs ("auto" picks merge for them: one pass of fp32 dots) and top_k = 2K, at the smaller T
            T = T_list[0]
            q32, k32 = make(T, H, n, dk, dtype=torch.float32)
            for name in ("merge", "threshold", "onepass", "packed", "queue"):
                cfg = impls[name]
                run.guarded(
                    "onepass",
                    f"fwd fp32 {name} T={T}",
                    lambda cfg=cfg, T=T, q32=q32, k32=k32: {"ms": bench_ms(lambda: forward(q32, k32, K, cfg)), "T": T},
                )
            del q32, k32
            qt, kt = make(T, H, n, dk)
            for name in ("merge", "threshold", "onepass", "packed", "queue"):
                cfg = impls[name]
                run.guarded(
                    "onepass",
                    f"fwd top_k={2 * K} {name} T={T}",
                    lambda cfg=cfg, T=T, qt=qt, kt=kt: {"ms": bench_ms(lambda: forward(qt, kt, 2 * K, cfg)), "T": T},
                )
        T = T_list[-1]
        qt, kt = make(T, H, n, dk)
        best, best_ms = None, float("inf")
        for launch in [] if quick else sweep:
            for prefix in ("cumsum", "dot"):
                cfg = dataclasses.replace(onepass, onepass_half=launch, onepass_prefix=prefix)
                res = run.guarded(
                    "onepass_sweep", f"{launch} {prefix} T={T}",
                    lambda cfg=cfg, qt=qt, kt=kt, T=T: {"ms": bench_ms(lambda: forward(qt, kt, K, cfg)), "T": T},
                )  # fmt: skip
                if res and res["ms"] < best_ms:
                    best, best_ms = cfg, res["ms"]
        if best is not None:
            run.add("onepass_sweep", "best", launch=best.onepass_half, prefix=best.onepass_prefix, ms=best_ms)
        qg, kg = qt.detach().requires_grad_(), kt.detach().requires_grad_()
        up = torch.randn(T, H, K, device=DEV)
        combos = {
            f"default ({default_name(qg, kg, K)}+{CFG.backward})": CFG,
            "threshold+sorted": dataclasses.replace(CFG, forward="threshold", backward="sorted"),
            "onepass+hybrid": onepass,
            "onepass+sorted": dataclasses.replace(onepass, backward="sorted"),
            "packed+sorted": dataclasses.replace(packed, backward="sorted"),
            "queue+sorted": dataclasses.replace(queue, backward="sorted"),
        }
        if best is not None:
            combos["onepass best+hybrid"] = best
        for name, cfg in combos.items():

            def step(cfg=cfg):
                s, _ = product_key_topk_triton(qg, kg, K, cfg)
                (s * up).sum().backward()

            run.guarded(
                "onepass",
                f"fwd+bwd {name} T={T}",
                lambda step=step: {"ms": bench_ms(step, grad_to_none=[qg, kg]), "T": T},
            )
        # the backwards under a collapsed router (make(hot=True)): a skew-robust one stays near its uniform time
        qh, kh = make(T, H, n, dk, hot=True)
        qh.requires_grad_()
        kh.requires_grad_()
        for bwd in ("hybrid", "sorted"):
            cfg = dataclasses.replace(CFG, backward=bwd)

            def hot_step(cfg=cfg):
                s, idx = product_key_topk_triton(qh, kh, K, cfg)
                (s * up).sum().backward()
                return idx

            def hot_row(hot_step=hot_step):
                idx = hot_step()
                share = ((idx // n) == 0).float().mean().item()  # selections whose first half is sub-key 0
                return {"ms": bench_ms(hot_step, grad_to_none=[qh, kh]), "T": T, "hot_share": share}

            run.guarded("onepass", f"fwd+bwd collapsed router {bwd} T={T}", hot_row)

    for part in (timings, checks) if timings_first else (checks, timings):
        part()


def profile_section(run, H, n, dk, K, T):
    """Per-kernel GPU times of one forward+backward through autograd for each combination (torch.profiler,
    after a warm-up step): where the time goes inside "threshold", "onepass" and the backwards."""
    from torch.profiler import ProfilerActivity, profile

    q, keys = make(T, H, n, dk)
    q.requires_grad_()
    keys.requires_grad_()
    up = torch.randn(T, H, K, device=DEV)
    combos = {
        "threshold+hybrid": dataclasses.replace(CFG, forward="threshold", backward="hybrid"),
        "onepass+hybrid": dataclasses.replace(CFG, forward="onepass", backward="hybrid"),
        "onepass+sorted": dataclasses.replace(CFG, forward="onepass", backward="sorted"),
    }
    for name, cfg in combos.items():

        def step(cfg=cfg):
            q.grad = keys.grad = None
            s, _ = product_key_topk_triton(q, keys, K, cfg)
            (s * up).sum().backward()

        def prof(step=step):
            step()  # compile and warm up outside the trace
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
            with profile(activities=acts) as p:
                step()
                if ON_GPU:
                    torch.cuda.synchronize()
            attr = "device_time_total" if ON_GPU else "cpu_time_total"
            events = sorted(p.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)
            rows = [(e.key[:80], e.count, round(getattr(e, attr, 0) / 1e3, 4)) for e in events[:20]]
            return {"T": T, "top_ms": rows}

        run.guarded("profile", f"{name} T={T}", prof)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results")))
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU + TRITON_INTERPRET=1)")
    p.add_argument("--only", choices=["onepass"], help="run only this section (section 0)")
    p.add_argument("--profile", action="store_true", help="also per-kernel times of one fwd+bwd (torch.profiler)")
    p.add_argument("--quick", action="store_true", help="section 0 without its fp32 / top_k rows and launch sweep")
    p.add_argument(
        "--timings-first", action="store_true", help="section 0's timing rows before its checks (short budgets)"
    )
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="start no new row after this many seconds")
    p.add_argument(
        "--rows",
        help="comma-separated substrings: run only the rows whose name holds one (e.g. 'queue,packed' for the "
        "rows a decision on those forwards needs; the reference computations still run)",
    )
    args = p.parse_args()
    if args.rows is not None and not [r for r in args.rows.split(",") if r.strip()]:
        p.error("--rows needs at least one substring, e.g. --rows queue,packed")
    set_budget(args.budget_s)
    if args.smoke:
        H, n, dk, K, T_check, T_list = 2, 32, 32, 4, 40, [40]
        sweep_thresh, sweep_dkeys, sweep_dq = [(32, 16, 4, 16, 0)], [(16, 16, 4, 0)], [(16, 4)]
        sweep_onepass = [(16, 16, 4, 16, 0)]
    else:
        H, n, dk, K, T_check, T_list = 8, 1024, 128, 16, 4096, [16384, 65536]
        sweep_thresh = [
            (64, 64, 4, 64, 8),
            (64, 64, 4, 32, 8),
            (64, 128, 4, 64, 8),
            (64, 128, 8, 64, 8),
            (128, 64, 8, 64, 4),
            (32, 64, 4, 64, 8),
            (64, 64, 8, 64, 8),
            (64, 64, 4, 64, 4),
        ]
        sweep_dkeys = [(128, 64, 8, 4), (64, 64, 4, 4), (128, 32, 4, 4), (256, 64, 8, 2), (128, 64, 4, 8)]
        sweep_dq = [(64, 4), (32, 4), (128, 8)]
        # "onepass" (BLOCK_M, BLOCK_N, warps, CAP, programs/SM); the default first. (64, 64, 4): wgmma, a
        # row per warp; 2 programs/SM: only as many as fit at once (255 registers); CAP 64; (32, 64, 4):
        # mma.sync, rows across warps; (16, 64, 1): one warp per program; BLOCK_N 128: 128 finer groups,
        # a tighter theta; 8 warps
        sweep_onepass = [
            (64, 64, 4, 32, 8),
            (64, 64, 4, 32, 2),
            (64, 64, 4, 64, 8),
            (32, 64, 4, 32, 8),
            (16, 64, 1, 32, 16),
            (64, 128, 4, 32, 8),
            (64, 64, 8, 32, 4),
        ]
    run = Run(args.out, {"H": H, "n": n, "d_key": dk, "top_k": K, "dtype": "bfloat16"})
    if args.rows is not None:
        run.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    onepass_section(
        run, H, n, dk, K, T_check, T_list, sweep_onepass, quick=args.quick, timings_first=args.timings_first
    )
    if args.profile:
        profile_section(run, H, n, dk, K, T_list[-1])
    if args.only == "onepass":
        run.add("done", "total", seconds=round(time.time() - T0, 1))
        return
    check_section(run, H, n, dk, K, T_check)
    for T in T_list:
        forward_section(run, H, n, dk, K, T)
    for T in T_list:
        backward_section(run, H, n, dk, K, T)
    for T in T_list:  # module defaults first, in case the sweeps run out of time
        fwd_bwd_section(run, H, n, dk, K, T, {})
    best = sweep_section(run, H, n, dk, K, T_list[-1], sweep_thresh, sweep_dkeys, sweep_dq)
    for T in T_list:
        fwd_bwd_section(run, H, n, dk, K, T, best)
    extra_section(run, H, n, dk, K, T_list[0], best)
    run.add("done", "total", seconds=round(time.time() - T0, 1))


if __name__ == "__main__":
    main()
