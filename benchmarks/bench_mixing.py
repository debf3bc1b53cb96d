"""Benchmark + full-size correctness check of the Triton expert-mixing op (torchpeer/ops/expert_mixing/triton_*.py).

    PYTHONUNBUFFERED=1 python benchmarks/bench_mixing.py [--sweep fwd,expert,dx] [--out DIR]
    TRITON_INTERPRET=1 python benchmarks/bench_mixing.py --smoke     # tiny CPU run of the script's logic

What it does (one GPU call):
  1. device copy bandwidth (the memory-bound ceiling);
  2. correctness at full size (N = 1024^2, d = 1024, T = 4096, H = 8, K = 16, bf16) against an fp32
     PyTorch reference, plus a ragged fp32 case (T = 1000, K = 5, d = 96) against float64;
  3. (--sweep) launch-config sweep of each kernel at T = 65536, d = 1024; the winners are used below;
  4. timings (median of CUDA-event timings via triton.testing.do_bench, L2 flushed between reps) of
     forward, backward (with its parts: sort, expert pass, dx pass) and fwd+bwd through autograd for
     T in {4096, 16384, 65536} x d in {512, 1024}, with the byte model's prediction, and peak memory
     of fwd+bwd above the parameters;
  5. the rejected alternative: token-centric backward with fp32 atomics into fp32 table gradients;
  6. for context, fwd+bwd of the pure-PyTorch backend torchpeer.ops.expert_mix_torch;
  7. (--tiled, or --only-tiled to skip 3-6) the tile-sorted forward prototype (triton_tiled.py,
     NOTES_mixing.md §5) against the token-centric forward at T in {16384, 32768, 65536}, d = 1024,
     uniform and skewed (90% of selections on 64 experts) routing, per tile size: sort, pass A,
     pass B, total, fwd+bwd through autograd, with the byte model's prediction; an L2 probe (the
     dx gather kernel on tables of 8-32 MB vs the 2 GiB table) measuring the L2-served gather rate;
     full-size correctness of the tiled path.
  8. (--decode) the forward at decoding sizes (T = 1, 2, 8, 32), token-centric vs split-S
     (triton_decode.py, NOTES_mixing.md §6) at 8/16/32 selections per program, bf16 and fp32
     tables: eager time (launch included) and CUDA-graph replay time, in us.
  9. (--readouts, or --only-readouts to skip 2-8) the read-outs of issue 18 at gpu-peer-multi-small's
     mixing shape (d = 512, N = 1024^2, H*K = 128, bf16, T in {16384, 32768}): paper (gelu), linear
     (activation identity) and glu (a third table, lin=) on the Triton kernels against the PyTorch
     backend (what linear and glu ran on before), fwd+bwd and peak memory; glu's error against an
     fp32 reference at T = 2048.
    TRITON_INTERPRET=1 python benchmarks/bench_mixing.py --smoke --only-tiled   # CPU check of 7
    python benchmarks/bench_mixing.py --model      # print the tiled byte model's tables, no kernels
Writes bench_mixing.json under --out (default: $OUT if set, else benchmarks/results).
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from torchpeer.ops.expert_mixing import expert_mix_reference  # noqa: E402
from torchpeer.ops.expert_mixing import triton_decode as decode  # noqa: E402
from torchpeer.ops.expert_mixing import triton_op as mixing  # noqa: E402
from torchpeer.ops.expert_mixing import triton_tiled as tiled  # noqa: E402
from torchpeer.ops.expert_mixing import triton_tiled_bwd as tiled_bwd  # noqa: E402
from torchpeer.ops.expert_mixing.triton_kernels import _act_and_grad  # noqa: E402
from torchpeer.ops.expert_mixing.triton_op import expert_mix_triton  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = "cuda" if ON_GPU else "cpu"
ES = 2  # bytes per bf16 element


def bench_ms(fn, grad_to_none=None):
    """Median ms of fn (CUDA events, L2 flushed between reps); a single wall-clock run on CPU."""
    if ON_GPU:
        return triton.testing.do_bench(fn, warmup=25, rep=150, grad_to_none=grad_to_none, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak_gib(fwd_bwd, leaves, inputs) -> float:
    """GiB that one fwd_bwd() allocates at its peak (gradients of `leaves` included) plus its `inputs`
    (activations, indices, gates, dy): the memory above the parameters. CUDA only."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    size = sum(t.numel() * t.element_size() for t in inputs)
    return (torch.cuda.max_memory_allocated() - before + size) / 2**30


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make_problem(T, H, K, d, N, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(T, d, device=DEV, generator=g).to(dtype)
    down = (torch.randn(N, d, device=DEV, generator=g) / math.sqrt(d)).to(dtype)  # h = x.u ~ N(0, 1)
    up = torch.randn(N, d, device=DEV, generator=g).to(dtype)
    idx = torch.randint(0, N, (T, H, K), device=DEV, generator=g)
    gates = torch.softmax(torch.randn(T, H, K, device=DEV, generator=g), dim=-1)
    dy = torch.randn(T, d, device=DEV, generator=g).to(dtype)
    return x, down, up, idx, gates, dy


# ----------------------------------------------------------------------------- byte model


def expected_used(N, n_sel):
    """Expected number of distinct experts among n_sel uniform picks out of N."""
    return N * (1.0 - math.exp(-n_sel / N))


def bytes_model(T, S, d, N):
    """Fewest bytes each kernel must move (bf16 rows, int64 indices, fp32 gates/h/coef)."""
    sel, row = T * S, d * ES
    used = expected_used(N, sel)
    fwd = sel * 2 * row + 2 * T * row + sel * (8 + 4 + 4)
    expert = sel * 2 * row + used * row + 2 * N * row + sel * (8 + 4 + 4 + 4 + 4) + 2 * (N + 1) * 8
    dx = sel * row + T * row + sel * (8 + 4)
    return {"fwd": fwd, "expert": expert, "dx": dx}


# ----------------------------------------------------------------------------- tile-sorted forward (NOTES §5)


def distinct_in(n_tok, S, N, hot_frac=0.0, n_hot=64):
    """Expected distinct experts picked by n_tok tokens: (1 - hot_frac) of the S picks uniform over N,
    hot_frac uniform over n_hot experts (the benchmarks' skewed routing; overlap ignored)."""
    cold = N * (1.0 - math.exp(-(1.0 - hot_frac) * n_tok * S / N))
    return cold + (n_hot * (1.0 - math.exp(-hot_frac * n_tok * S / n_hot)) if hot_frac else 0.0)


def tile_pairs(T, S, N, tile, hot_frac=0.0, n_hot=64):
    """Expected distinct (token tile, expert) pairs: the u rows pass A reads from DRAM."""
    full, rest = divmod(T, tile)
    return full * distinct_in(tile, S, N, hot_frac, n_hot) + (distinct_in(rest, S, N, hot_frac, n_hot) if rest else 0)


def sort_ms_model(n_sel):
    """torch.sort of int32 keys + int64 perm on the H200, affine fit of run 2 (0.12 / 0.21 / 0.52 ms at
    0.52M / 2.1M / 8.4M selections; the measured 'sort' also had a searchsorted, so a slight overcount)."""
    return 0.107 + 0.049 * n_sel / 1e6


def tiled_forward_model(T, S, d, N, tile, hot_frac=0.0, n_hot=64, bw=4.4e12, k_l2=3.0, u_hits=True):
    """Predicted ms of the token-centric forward and of the tiled one (sort, pass A, pass B).

    Each pass costs max(DRAM bytes / bw, L2 bytes / (k_l2 * bw)): gathered rows served by L2 still
    cost L2 bandwidth, k_l2 times the DRAM rate (unknown on the H200: the L2 probe measures it).
    bw: 4.4 TB/s, the rate the forward reaches (NOTES §3). Rows of hot experts (skew) come from L2.
    u_hits: repeated u rows of a (tile, expert) are L1 hits (L2 reads u once per pair); False: every
    repeat is an L2 read (the pessimistic end)."""
    row, sel = d * ES, T * S
    cold_sel = (1.0 - hot_frac) * sel
    gathered_dram = cold_sel + (n_hot if hot_frac else 0)  # rows a token-centric gather takes from DRAM
    small = 16 * sel + 2 * T * row  # idx, gate, h + x, y
    cur = max((2 * gathered_dram * row + small) / bw, (2 * sel * row + small) / (k_l2 * bw))
    pairs = tile_pairs(T, S, N, tile, hot_frac, n_hot)
    a_dram = pairs * row + T * row + 16 * sel  # u once per pair, x once, keys + perm + h
    a_l2 = sel * row + (pairs if u_hits else sel) * row + 16 * sel
    b_dram = gathered_dram * row + T * row + 16 * sel  # v per selection, y, idx + gate + h
    b_l2 = sel * row + T * row + 16 * sel
    a = max(a_dram / bw, a_l2 / (k_l2 * bw))
    b = max(b_dram / bw, b_l2 / (k_l2 * bw))
    srt = sort_ms_model(sel) * 1e-3
    r = {"pairs_per_sel": pairs / sel, "cur_ms": cur, "sort_ms": srt, "a_ms": a, "b_ms": b, "tiled_ms": srt + a + b}
    r = {key: (v * 1e3 if key.endswith("_ms") else v) for key, v in r.items()}
    r["gain_ms"] = r["cur_ms"] - r["tiled_ms"]
    r["gain_shared_sort_ms"] = r["gain_ms"] + r["sort_ms"]  # if the backward reused the sort
    return r


def tiled_expert_model(T, S, d, N, tile, bw=4.25e12):
    """Byte floors (GB, ms at the copy rate) of the backward expert pass: default (x and dy rows per
    selection, v_e once per used expert, dU and dV rows written once) and tiled (v_e once per (tile,
    expert) pair; the gradient rows written by an expert's first tile, read + written by each later
    one; zero rows for unused experts; x and dy once per tile; NOTES §5.3). Uniform routing."""
    row, sel = d * ES, T * S
    used = distinct_in(T, S, N)
    pairs = tile_pairs(T, S, N, tile)
    default = (2 * sel + used + 2 * N) * row + 24 * sel
    tiled_b = (pairs + 2 * (2 * pairs - 2 * used + N)) * row + 2 * T * row + 48 * sel
    return {
        "default_gb": default / 1e9,
        "tiled_gb": tiled_b / 1e9,
        "default_ms": default / bw * 1e3,
        "tiled_ms": tiled_b / bw * 1e3,
        "gain_ms": (default - tiled_b) / bw * 1e3,
    }


def print_tiled_model(S=128, d=1024, N=1024**2):
    """The tables of NOTES_mixing.md §5 (forward): gain (ms) of the tiled forward over the token-centric."""
    print("| routing | T | tile | x tile MB | pairs/sel | k_l2 | cur ms | sort+A+B ms | gain ms | gain, sort shared |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for hot in (0.0, 0.9):
        for T in (16384, 32768, 65536):
            for tile in (4096, 8192, 16384):
                if tile > T:
                    continue
                for k in (2.0, 3.0, 4.0):
                    lo = tiled_forward_model(T, S, d, N, tile, hot, k_l2=k, u_hits=False)
                    hi = tiled_forward_model(T, S, d, N, tile, hot, k_l2=k, u_hits=True)
                    print(
                        f"| {'skew 90/64' if hot else 'uniform'} | {T} | {tile} | {tile * d * ES / 1e6:.0f} | "
                        f"{hi['pairs_per_sel']:.3f} | {k:g} | {hi['cur_ms']:.2f} | "
                        f"{hi['sort_ms']:.2f}+{hi['a_ms']:.2f}..{lo['a_ms']:.2f}+{hi['b_ms']:.2f} | "
                        f"{lo['gain_ms']:.2f}..{hi['gain_ms']:.2f} | "
                        f"{lo['gain_shared_sort_ms']:.2f}..{hi['gain_shared_sort_ms']:.2f} |"
                    )
    print("\n| backward expert pass | T | tile | DRAM GB default / tiled | floor ms default / tiled | gain ms |")
    print("|---|---|---|---|---|---|")
    for T in (32768, 65536):
        for tile in (8192, 12288, 16384):
            m = tiled_expert_model(T, S, d, N, tile)
            print(
                f"| uniform | {T} | {tile} | {m['default_gb']:.1f} / {m['tiled_gb']:.1f} | "
                f"{m['default_ms']:.2f} / {m['tiled_ms']:.2f} | {m['gain_ms']:+.2f} |"
            )


def try_ms(fn, what):
    """bench_ms(fn), or NaN (said on stdout) if it fails: one variant that does not compile on this
    triton (e.g. tl.gather of the DEDUP pass) must not cost the rest of the run."""
    try:
        return bench_ms(fn)
    except Exception as e:
        print(f"  {what}: FAILED {type(e).__name__}: {str(e)[:300]}")
        return float("nan")


def skewed_indices(T, H, K, N, hot_frac, n_hot=64, seed=0):
    """(T, H, K) int64: uniform experts, except hot_frac of the selections on experts 0..n_hot-1
    (benchmarks/lm_throughput.py's skewed routing)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    idx = torch.randint(0, N, (T, H, K), device=DEV, generator=g)
    if hot_frac:
        hot = torch.rand((T, H, K), device=DEV, generator=g) < hot_frac
        idx = torch.where(hot, torch.randint(0, n_hot, (T, H, K), device=DEV, generator=g), idx)
    return idx


def l2_gather_probe(d, T, S=128, rows=(4096, 8192, 16384, 1024**2)):
    """TB/s of the dx gather kernel (one table row per selection) on tables of `rows` rows: tables of
    8-32 MB are served by L2, 1024^2 rows (2 GiB) by DRAM; the ratio is the model's k_l2."""
    out = []
    x = torch.randn(T, d, device=DEV).to(torch.bfloat16)
    coef = torch.randn(T * S, device=DEV)
    dx = torch.empty_like(x)
    for n in rows:
        table = torch.randn(n, d, device=DEV).to(torch.bfloat16)
        idx = torch.randint(0, n, (T, S // 8, 8), device=DEV)
        ms = bench_ms(lambda table=table, idx=idx: mixing._launch_dx(table, idx, coef, dx))
        out.append({"rows": n, "table_mb": n * d * ES / 1e6, "ms": ms, "tbps": T * S * d * ES / (ms * 1e-3) / 1e12})
        mb = n * d * ES / 1e6
        print(f"L2 probe: gather from a {n}-row table ({mb:.0f} MB): {ms:.3f} ms, {out[-1]['tbps']:.2f} TB/s")
        del table
    for r in out:
        r["ratio_to_dram"] = r["tbps"] / out[-1]["tbps"]
    return out


def time_tiled(T, H, K, d, N, tables, tiles, hot_frac, sweep_a=False):
    """Token-centric vs tile-sorted forward (and fwd+bwd through autograd) on the same inputs."""
    down, up = tables
    S = H * K
    x, _, _, _, gates, dy = make_problem(T, H, K, d, 1, seed=10)
    idx = skewed_indices(T, H, K, N, hot_frac, seed=11)
    saved = dict(mixing.TUNING["fwd"])
    mixing.TUNING["fwd"] = dict(saved, tile_tokens=None)
    r = {
        "T": T,
        "d": d,
        "N": N,
        "hot_frac": hot_frac,
        "cur_fwd_ms": bench_ms(lambda: mixing._forward_impl(x, down, up, idx, gates, "gelu")),
    }
    y0, h0 = mixing._forward_impl(x, down, up, idx, gates, "gelu")
    leaves = [t.requires_grad_() for t in (x, down, up, gates)]

    def fwd_bwd():
        expert_mix_triton(leaves[0], leaves[1], leaves[2], idx, leaves[3]).backward(dy)

    r["cur_fwd_bwd_ms"] = bench_ms(fwd_bwd, grad_to_none=leaves)
    r["tiles"] = []
    xd, dd, ud, gd = (a.detach() for a in leaves)
    if not hot_frac:  # the expert pass with its sort (the tiled one is not skew-robust: skew falls back)
        gbufs = [
            torch.empty_like(dd),
            torch.empty_like(ud),
            torch.empty(T * S, device=DEV),
            torch.empty(T * S, device=DEV),
        ]

        def expert_default():
            perm, offsets = mixing._sort_by_expert(idx, N)
            mixing._launch_expert(dy, xd, ud, gd, h0, perm, offsets, *gbufs, "gelu")

        r["cur_expert_ms"] = bench_ms(expert_default)
    by_expert = torch.sort(idx.reshape(-1).to(torch.int32), stable=True)
    for tile in tiles:
        if tile > T and tile != tiles[0]:
            continue
        t = {"tile": tile, "model_k3": tiled_forward_model(T, S, d, N, tile, hot_frac, u_hits=False)}
        t["model_k3_dedup"] = tiled_forward_model(T, S, d, N, tile, hot_frac, u_hits=True)
        t["sort_ms"] = bench_ms(lambda tile=tile: tiled.sort_by_tile_and_expert(idx, N, tile))
        # the shared-sort design (§5.5): the forward sorts by expert (the backward's sort, kept for it)
        # and partitions by tile; what it adds over today's fwd+bwd is the partition alone
        t["partition_ms"] = bench_ms(lambda tile=tile: tiled.tile_partition(*by_expert, S, tile))
        keys, perm = tiled.sort_by_tile_and_expert(idx, N, tile)
        h, y = torch.empty_like(h0), torch.empty_like(y0)
        t["a_ms"] = bench_ms(lambda kp=(keys, perm), h=h: tiled.launch_h(xd, dd, *kp, h))
        tiled.TILED_TUNING["dedup"] = True
        t["a_dedup_ms"] = try_ms(lambda kp=(keys, perm), h=h: tiled.launch_h(xd, dd, *kp, h), "pass A dedup")
        tiled.TILED_TUNING["dedup"] = False
        t["b_ms"] = bench_ms(lambda h=h, y=y: tiled.launch_y(ud, idx, gd, h, y, "gelu"))
        if sweep_a:  # pass A's launch config (rows x 1024 per block, warps), both variants
            t["a_sweep"] = []
            default = dict(tiled.TILED_TUNING["h"])
            for tile_elems, warps in ((4096, 2), (8192, 4), (8192, 2), (16384, 4)):
                for flag in (False, True):
                    tiled.TILED_TUNING["h"] = {"tile": tile_elems, "num_warps": {1024: warps}}
                    tiled.TILED_TUNING["dedup"] = flag
                    ms = try_ms(lambda kp=(keys, perm), h=h: tiled.launch_h(xd, dd, *kp, h), "pass A")
                    t["a_sweep"].append({"tile": tile_elems, "warps": warps, "dedup": flag, "ms": ms})
                    print(f"  pass A tile {tile_elems} warps {warps} dedup {flag}: {ms:.3f} ms")
            tiled.TILED_TUNING["h"], tiled.TILED_TUNING["dedup"] = default, False
        del keys, perm
        args = (xd, dd, ud, idx, gd, "gelu", tile)
        t["fwd_ms"] = bench_ms(lambda args=args: tiled.expert_mix_tiled_forward(*args))
        tiled.TILED_TUNING["dedup"] = True
        t["fwd_dedup_ms"] = try_ms(lambda args=args: tiled.expert_mix_tiled_forward(*args), "tiled fwd dedup")
        tiled.TILED_TUNING["dedup"] = False
        y, h = tiled.expert_mix_tiled_forward(*args)
        t["rel_diff_vs_token_centric"] = {"y": rel_err(y, y0), "h": rel_err(h, h0)}
        mixing.TUNING["fwd"] = dict(saved, tile_tokens=tile)
        t["fwd_bwd_ms"] = bench_ms(fwd_bwd, grad_to_none=leaves)
        if not hot_frac:  # tiled expert pass (NOTES §5.3): plan + 2 launches per tile, then both tiled
            t["expert_plan_ms"] = bench_ms(lambda tile=tile: tiled_bwd.tile_plan(idx, N, tile))

            def expert_tiled(tile=tile):
                plan = tiled_bwd.tile_plan(idx, N, tile)
                tiled_bwd.launch_expert_tiled(dy, xd, ud, gd, h0, plan, *gbufs, "gelu")

            t["expert_ms"] = bench_ms(expert_tiled)
            saved_expert = dict(mixing.TUNING["expert"])
            mixing.TUNING["expert"] = dict(saved_expert, tile_tokens=tile)
            t["fwd_bwd_both_tiled_ms"] = bench_ms(fwd_bwd, grad_to_none=leaves)
            mixing.TUNING["expert"] = saved_expert
            print(
                f"  tiled expert pass T={T} tile={tile}: {t['expert_ms']:.3f} ms (plan {t['expert_plan_ms']:.3f})"
                f" vs default {r['cur_expert_ms']:.3f} (sort included); fwd+bwd both tiled"
                f" {t['fwd_bwd_both_tiled_ms']:.3f} vs {r['cur_fwd_bwd_ms']:.3f}"
            )
        mixing.TUNING["fwd"] = dict(saved, tile_tokens=None)
        t["gain_fwd_ms"] = r["cur_fwd_ms"] - t["fwd_ms"]
        # shared sort: fwd+bwd gain = token-centric fwd - (partition + best pass A + pass B)
        t["gain_shared_sort_est_ms"] = r["cur_fwd_ms"] - (
            t["partition_ms"] + min(t["a_ms"], t["a_dedup_ms"]) + t["b_ms"]
        )
        t["gain_fwd_bwd_ms"] = r["cur_fwd_bwd_ms"] - t["fwd_bwd_ms"]
        r["tiles"].append(t)
        print(
            f"tiled T={T} hot={hot_frac} tile={tile}: sort {t['sort_ms']:.3f} + A {t['a_ms']:.3f}"
            f" (dedup {t['a_dedup_ms']:.3f}) + B {t['b_ms']:.3f}; partition {t['partition_ms']:.3f}"
            f" (gain if the sort is shared {t['gain_shared_sort_est_ms']:.3f})"
            f" -> fwd {t['fwd_ms']:.3f} ms vs {r['cur_fwd_ms']:.3f} (model {t['model_k3']['tiled_ms']:.2f} vs"
            f" {t['model_k3']['cur_ms']:.2f}); fwd+bwd {t['fwd_bwd_ms']:.3f} vs {r['cur_fwd_bwd_ms']:.3f};"
            f" rel diff {t['rel_diff_vs_token_centric']}"
        )
        del y, h
    mixing.TUNING["fwd"] = saved
    for t in leaves:
        t.grad = None
        t.requires_grad_(False)
    return r


# ----------------------------------------------------------------------------- decoding: split-S forward (§6)


def time_decode(d, N, sizes=(1, 2, 8, 32), splits=(None, 8, 16, 32), H=8, K=16):
    """Forward us at decoding batch sizes: token-centric (split None) vs split-S, bf16 and fp32 tables."""
    rows = []
    saved = dict(mixing.TUNING["fwd"])
    saved_split = decode.SPLIT_TUNING["split"]
    for tdt in (torch.bfloat16, torch.float32):
        down, up = make_problem(1, 1, 1, d, N, dtype=tdt, seed=12)[1:3]
        for T in sizes:
            x, _, _, _, gates, _ = make_problem(T, H, K, d, 1, seed=13)
            idx = torch.randint(0, N, (T, H, K), device=DEV)
            y_ref = None
            for split in splits:
                mixing.TUNING["fwd"] = dict(saved, split_below=None if split is None else 1 << 30)
                decode.SPLIT_TUNING["split"] = split or saved_split

                def fwd(x=x, idx=idx, gates=gates, down=down, up=up):
                    return mixing._forward_impl(x, down, up, idx, gates, "gelu")

                y, _ = fwd()
                y_ref = y if y_ref is None else y_ref
                r = {"tables": str(tdt).split(".")[-1], "T": T, "d": d, "split": split, "eager_us": bench_ms(fwd) * 1e3}
                if ON_GPU:
                    r["graph_us"] = triton.testing.do_bench_cudagraph(fwd, rep=50) * 1e3
                r["rel_diff_vs_token_centric"] = rel_err(y, y_ref)
                rows.append(r)
                print(f"decode: {json.dumps(r)}")
        del down, up
        if ON_GPU:
            torch.cuda.empty_cache()
    mixing.TUNING["fwd"] = saved
    decode.SPLIT_TUNING["split"] = saved_split
    return rows


# ----------------------------------------------------------------------------- the rejected alternative


@triton.jit
def _bwd_atomic_kernel(
    x_ptr, dy_ptr, down_ptr, up_ptr, idx_ptr, gate_ptr, h_ptr, ddown_ptr, dup_ptr, dgate_ptr, dx_ptr,
    S, D, ACT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Token-centric fused backward: dx, dgate directly; table grads by fp32 atomics (nondeterministic)."""
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    x = tl.load(x_ptr + t * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + t * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < S
        e = tl.load(idx_ptr + t * S + offs_s, mask=smask, other=0).to(tl.int64)
        g = tl.load(gate_ptr + t * S + offs_s, mask=smask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + t * S + offs_s, mask=smask, other=0.0)
        m2 = smask[:, None] & dmask[None, :]
        rows = e[:, None] * D + offs_d[None, :]
        u = tl.load(down_ptr + rows, mask=m2, other=0.0).to(tl.float32)
        v = tl.load(up_ptr + rows, mask=m2, other=0.0).to(tl.float32)
        s = tl.sum(v * dy[None, :], axis=1)
        a, da = _act_and_grad(h, ACT)
        coef = g * da * s
        tl.store(dgate_ptr + t * S + offs_s, a * s, mask=smask)
        acc += tl.sum(coef[:, None] * u, axis=0)
        tl.atomic_add(ddown_ptr + rows, coef[:, None] * x[None, :], mask=m2, sem="relaxed")
        tl.atomic_add(dup_ptr + rows, (g * a)[:, None] * dy[None, :], mask=m2, sem="relaxed")
    tl.store(dx_ptr + t * D + offs_d, acc.to(dx_ptr.dtype.element_ty), mask=dmask)


def backward_atomic(dy, x, down, up, idx, gates, h, block_s=8, num_warps=8):
    T, d = x.shape
    S = idx[0].numel()
    ddown32 = torch.zeros(down.shape, dtype=torch.float32, device=x.device)
    dup32 = torch.zeros(up.shape, dtype=torch.float32, device=x.device)
    dgate = torch.empty(T * S, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    _bwd_atomic_kernel[(T,)](
        x, dy, down, up, idx, gates, h, ddown32, dup32, dgate, dx, S, d,
        ACT=0, BLOCK_S=block_s, BLOCK_D=triton.next_power_of_2(d), num_warps=num_warps,
    )  # fmt: skip
    return dx, ddown32.to(down.dtype), dup32.to(up.dtype), dgate.view(gates.shape)


# ----------------------------------------------------------------------------- steps


def copy_bandwidth():
    n = (2 << 30) // ES if ON_GPU else 1 << 20
    a = torch.randn(n, device=DEV).to(torch.bfloat16)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    return 2 * n * ES / ms / 1e9  # TB/s (read + write)


def check_correctness(T, H, K, d, N):
    out = {}
    # full-size bf16 vs fp32 PyTorch reference (the reference gathers (T, H, K, d) rows)
    x, down, up, idx, gates, dy = make_problem(T, H, K, d, N, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, down, up, gates)]
    y = expert_mix_triton(leaves[0], leaves[1], leaves[2], idx, leaves[3])
    y.backward(dy)
    ref = [t.detach().float().requires_grad_() for t in (x, down, up, gates)]
    y_ref = expert_mix_reference(ref[0], ref[1], ref[2], idx, ref[3])
    y_ref.backward(dy.float())
    errs = {"y": rel_err(y, y_ref)}
    for name, a, b in zip(("dx", "ddown", "dup", "dgates"), leaves, ref):
        errs[name] = rel_err(a.grad, b.grad)
    # determinism: a second backward must be bitwise identical
    first = [a.grad.clone() for a in leaves]
    for a in leaves:
        a.grad = None
    expert_mix_triton(leaves[0], leaves[1], leaves[2], idx, leaves[3]).backward(dy)
    out["bitwise_deterministic"] = all(torch.equal(f, a.grad) for f, a in zip(first, leaves))
    out["bf16_full_size"] = {"shape": [T, H, K, d, N], "rel_err": errs, "pass": max(errs.values()) < 1e-2}
    del leaves, ref, y, y_ref, first
    # ragged fp32 case vs float64: T not a block multiple, K = 5, d = 96, relu
    Tr, Hr, Kr, dr, Nr = (1000, 3, 5, 96, 4096) if ON_GPU else (7, 3, 5, 24, 32)
    x, down, up, idx, gates, dy = make_problem(Tr, Hr, Kr, dr, Nr, dtype=torch.float32, seed=2)
    leaves = [t.clone().requires_grad_() for t in (x, down, up, gates)]
    expert_mix_triton(leaves[0], leaves[1], leaves[2], idx, leaves[3], "relu").backward(dy)
    ref = [t.detach().double().requires_grad_() for t in (x, down, up, gates)]
    expert_mix_reference(ref[0], ref[1], ref[2], idx, ref[3], "relu").backward(dy.double())
    errs = {name: rel_err(a.grad, b.grad) for name, a, b in zip(("dx", "ddown", "dup", "dgates"), leaves, ref)}
    out["fp32_ragged"] = {"shape": [Tr, Hr, Kr, dr, Nr], "rel_err": errs, "pass": max(errs.values()) < 1e-4}
    return out


def time_parts(T, H, K, d, N, tables):
    """Times of forward, backward and its parts, fwd+bwd via autograd, peak memory; with the model."""
    down, up = tables
    x, _, _, idx, gates, dy = make_problem(T, H, K, d, 1, seed=3)
    idx = torch.randint(0, N, (T, H, K), device=DEV)
    S = H * K
    r = {"T": T, "d": d, "N": N, "H": H, "K": K}
    r["fwd_ms"] = bench_ms(lambda: mixing._forward_impl(x, down, up, idx, gates, "gelu"))
    _, h = mixing._forward_impl(x, down, up, idx, gates, "gelu")
    r["bwd_ms"] = bench_ms(lambda: mixing._backward_impl(dy, x, down, up, idx, gates, h, "gelu"))
    r["sort_ms"] = bench_ms(lambda: mixing._sort_by_expert(idx, N))
    perm, offsets = mixing._sort_by_expert(idx, N)
    bufs = [
        torch.empty_like(down),
        torch.empty_like(up),
        torch.empty(T * S, device=DEV),
        torch.empty(T * S, device=DEV),
    ]
    r["expert_ms"] = bench_ms(lambda: mixing._launch_expert(dy, x, up, gates, h, perm, offsets, *bufs, "gelu"))
    coef = bufs[2]
    dx = torch.empty_like(x)
    r["dx_ms"] = bench_ms(lambda: mixing._launch_dx(down, idx, coef, dx))
    leaves = [t.requires_grad_() for t in (x, down, up, gates)]

    def fwd_bwd():
        expert_mix_triton(leaves[0], leaves[1], leaves[2], idx, leaves[3]).backward(dy)

    r["fwd_bwd_ms"] = bench_ms(fwd_bwd, grad_to_none=leaves)
    h = perm = offsets = bufs = coef = dx = None  # free: not part of what fwd+bwd allocates
    if ON_GPU:
        r["peak_above_params_gib"] = peak_gib(fwd_bwd, leaves, (x, idx, gates, dy))
    for t in leaves:
        t.grad = None
        t.requires_grad_(False)
    model = bytes_model(T, S, d, N)
    r["model_gb"] = {k: v / 1e9 for k, v in model.items()}
    for k in ("fwd", "expert", "dx"):
        r[f"{k}_tbps"] = model[k] / (r[f"{k}_ms"] * 1e-3) / 1e12
    return r


def time_torch_backend(T, H, K, d, N, tables):
    """fwd+bwd time and peak memory of torchpeer.ops.expert_mix_torch (the lean PyTorch backend)."""
    from torchpeer.ops import expert_mix_torch

    down, up = tables
    x, _, _, idx, gates, dy = make_problem(T, H, K, d, 1, seed=7)
    idx = torch.randint(0, N, (T, H, K), device=DEV)
    leaves = [t.requires_grad_() for t in (x, down, up, gates)]

    def fwd_bwd():
        expert_mix_torch(leaves[0], leaves[1], leaves[2], idx, leaves[3]).backward(dy)

    r = {"T": T, "d": d, "fwd_bwd_ms": bench_ms(fwd_bwd, grad_to_none=leaves)}
    if ON_GPU:
        r["peak_above_params_gib"] = peak_gib(fwd_bwd, leaves, (x, idx, gates, dy))
    for t in leaves:
        t.grad = None
        t.requires_grad_(False)
    print(f"peer_mix_torch T={T} d={d}: {json.dumps(r)}")
    return r


def time_fp32_tables(T, H, K, d, N):
    """fp32 master tables with bf16 activations (the autocast case): rows are read as fp32."""
    x, _, _, idx, gates, dy = make_problem(T, H, K, d, 1, seed=8)
    down, up = make_problem(1, 1, 1, d, N, dtype=torch.float32, seed=9)[1:3]
    idx = torch.randint(0, N, (T, H, K), device=DEV)
    r = {"T": T, "d": d, "fwd_ms": bench_ms(lambda: mixing._forward_impl(x, down, up, idx, gates, "gelu"))}
    _, h = mixing._forward_impl(x, down, up, idx, gates, "gelu")
    r["bwd_ms"] = bench_ms(lambda: mixing._backward_impl(dy, x, down, up, idx, gates, h, "gelu"))
    print(f"fp32 tables, bf16 x: {json.dumps(r)}")
    return r


# Configs: tile = BLOCK_S * BLOCK_D; num_warps = {BLOCK_D: warps}, other BLOCK_D scale the 1024 entry.
# History (NOTES_mixing.md): run 1 also timed 8 and 16 warps (fwd 10.5-10.9 ms, expert 42-58 ms,
# dx 5.8-6.0 ms at T = 65536, d = 1024), num_stages = 2 (same PTX as 1: Triton's pipeliner leaves
# gather loops that feed no tl.dot alone) and 2 or 4 experts per program (slower: 14-57 ms).
SWEEP = {
    "fwd": [
        {"tile": 4096, "num_warps": {1024: 2}},
        {"tile": 8192, "num_warps": {1024: 4}},
        {"tile": 16384, "num_warps": {1024: 4}},
        {"tile": 16384, "num_warps": {1024: 8}},
    ],
    "expert": [
        {"tile": 1024, "num_warps": {1024: 4}},
        {"tile": 2048, "num_warps": {1024: 4}},
        {"tile": 4096, "num_warps": {1024: 4}},
        {"tile": 1024, "num_warps": {1024: 2}},
        {"tile": 2048, "num_warps": {1024: 2}},
    ],
    "dx": [
        {"tile": 4096, "num_warps": {1024: 2}},
        {"tile": 8192, "num_warps": {1024: 4}},
        {"tile": 16384, "num_warps": {1024: 4}},
        {"tile": 16384, "num_warps": {1024: 8}},
    ],
}


def time_readouts(d, N, sizes, H=8, K=16):
    """Step 9: fwd+bwd (ms) and peak memory of each read-out on the Triton kernels and on the PyTorch
    backend, per T; glu's relative error against an fp32 reference on the first 2048 tokens."""
    from torchpeer.ops import expert_mix

    gen = torch.Generator(device=DEV).manual_seed(11)
    tables = [(torch.randn(N, d, device=DEV, generator=gen) / d**0.25).to(torch.bfloat16) for _ in range(3)]
    out = []
    for T in sizes:
        x = torch.randn(T, d, device=DEV, generator=gen).to(torch.bfloat16)
        idx = torch.randint(0, N, (T, H, K), device=DEV, generator=gen)
        gates = torch.rand(T, H, K, device=DEV, generator=gen).softmax(-1)
        dy = torch.randn(T, d, device=DEV, generator=gen).to(torch.bfloat16)
        for readout, act, glu in (("paper", "gelu", False), ("linear", "identity", False), ("glu", "gelu", True)):
            for backend in ("triton", "torch"):
                leaves = [t.requires_grad_() for t in (x, *tables, gates)]

                def fwd_bwd():
                    lin = leaves[3] if glu else None  # noqa: B023
                    y = expert_mix(leaves[0], leaves[1], leaves[2], idx, leaves[4], act, lin=lin, backend=backend)  # noqa: B023
                    y.backward(dy)  # noqa: B023

                r = {"readout": readout, "backend": backend, "T": T, "d": d, "N": N}
                try:  # one failing variant (e.g. out of memory on the PyTorch backend) must not end the run
                    r["fwd_bwd_ms"] = bench_ms(fwd_bwd, grad_to_none=leaves)
                except Exception as e:
                    r["fwd_bwd_ms"], r["error"] = None, f"{type(e).__name__}: {str(e)[:300]}"
                if ON_GPU and r["fwd_bwd_ms"] is not None:
                    r["peak_above_params_gib"] = peak_gib(fwd_bwd, leaves, (x, idx, gates, dy))
                for t in leaves:
                    t.grad = None
                    t.requires_grad_(False)
                print(json.dumps(r))
                out.append(r)
                if ON_GPU:
                    torch.cuda.empty_cache()
    n = min(2048, sizes[0])
    x = torch.randn(n, d, device=DEV, generator=gen).to(torch.bfloat16)
    idx = torch.randint(0, N, (n, H, K), device=DEV, generator=gen)
    gates = torch.rand(n, H, K, device=DEV, generator=gen).softmax(-1)
    got = expert_mix(x, *tables[:2], idx, gates, "gelu", lin=tables[2], backend="triton")
    ref = expert_mix(x.float(), *(t.float() for t in tables[:2]), idx, gates, "gelu", lin=tables[2].float(),
                     backend="reference")  # fmt: skip
    out.append({"glu_rel_err_vs_fp32": rel_err(got.float(), ref)})
    print(json.dumps(out[-1]))
    return out


def sweep(T, H, K, d, N, tables, kernels):
    """Time every config of each kernel on the same inputs; keep the fastest in mixing.TUNING.

    Each config's output is compared with the first config's (summation order differs, so ~1e-3
    bf16 noise is expected; a masking bug would show as O(1))."""
    down, up = tables
    x, _, _, idx, gates, dy = make_problem(T, H, K, d, 1, seed=4)
    idx = torch.randint(0, N, (T, H, K), device=DEV)
    S = H * K
    _, h = mixing._forward_impl(x, down, up, idx, gates, "gelu")
    perm, offsets = mixing._sort_by_expert(idx, N)
    bufs = [torch.empty_like(down), torch.empty_like(up)] + [torch.empty(T * S, device=DEV) for _ in range(2)]
    dx = torch.empty_like(x)

    def run_expert():
        mixing._launch_expert(dy, x, up, gates, h, perm, offsets, *bufs, "gelu")
        return torch.cat([bufs[0][:4096].flatten().float(), bufs[1][:4096].flatten().float(), bufs[2]])

    def run_dx():
        mixing._launch_dx(down, idx, bufs[2], dx)
        return dx

    runs = {"fwd": lambda: mixing._forward_impl(x, down, up, idx, gates, "gelu")[0], "expert": run_expert, "dx": run_dx}
    results = {}
    for kernel in kernels:
        configs = SWEEP[kernel]
        default = dict(mixing.TUNING[kernel])
        timed, first = [], None
        for cfg in configs:
            mixing.TUNING[kernel] = dict(cfg)
            try:
                out = runs[kernel]().clone()
                ms = bench_ms(runs[kernel])
            except Exception as e:  # a config that fails to compile is reported, not fatal
                print(f"  {kernel} {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            first = out if first is None else first
            diff = rel_err(out, first)
            timed.append((ms, cfg, diff))
            print(f"  {kernel} {cfg}: {ms:.3f} ms  (rel diff vs first config {diff:.1e})")
        ok = [(ms, cfg) for ms, cfg, diff in timed if diff < 2e-2]
        best = min(ok, key=lambda p: p[0])[1] if ok else default
        mixing.TUNING[kernel] = dict(best)
        results[kernel] = {"timed": [{"ms": ms, "rel_diff": df, **c} for ms, c, df in timed], "best": best}
    return results


def write_json(res, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_mixing.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)
    print("wrote", path)
    return path


def run_tiled(args, corr, N, H, K, dims):
    """Step 7: L2 probe, full-size correctness of the tiled path, tiled vs token-centric timings."""
    out = {"tuning": json.loads(json.dumps(tiled.TILED_TUNING))}
    d = max(dims)
    if args.smoke:
        sizes, tiles = [9, 16], [4, 8]
        out["l2_probe"] = l2_gather_probe(d, 8, S=8, rows=(16, 256))
    else:
        sizes, tiles = [16384, 32768, 65536], [int(t) for t in args.tiles.split(",")]
        out["l2_probe"] = l2_gather_probe(d, 16384)
    saved = dict(mixing.TUNING["fwd"])
    mixing.TUNING["fwd"] = dict(saved, tile_tokens=1024 if not args.smoke else 4)
    t0 = time.time()
    out["correctness"] = check_correctness(*corr)  # expert_mix_triton with the tiled forward
    mixing.TUNING["fwd"] = saved
    print("tiled correctness:", json.dumps(out["correctness"]), f"({time.time() - t0:.0f} s)")
    tables = make_problem(1, 1, 1, d, N, seed=5)[1:3]
    out["timings"] = []
    for hot in (0.0, 0.9):
        for T in sizes:
            sweep_a = hot == 0.0 and T == sizes[-1]
            out["timings"].append(time_tiled(T, H, K, d, N, tables, tiles, hot, sweep_a))
            if ON_GPU:
                torch.cuda.empty_cache()
    print(
        "\n| routing | T | tile | token-centric fwd ms | sort + A (dedup) + B = tiled fwd ms (dedup) | "
        "model k_l2 = 3: token-centric -> tiled (dedup) | fwd+bwd ms: token-centric / tiled | "
        "partition ms, gain if the sort is shared |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in out["timings"]:
        for t in r["tiles"]:
            m = t["model_k3"]
            print(
                f"| {'skew' if r['hot_frac'] else 'uniform'} | {r['T']} | {t['tile']} | {r['cur_fwd_ms']:.2f} | "
                f"{t['sort_ms']:.2f} + {t['a_ms']:.2f} ({t['a_dedup_ms']:.2f}) + {t['b_ms']:.2f} = "
                f"{t['fwd_ms']:.2f} ({t['fwd_dedup_ms']:.2f}) | {m['cur_ms']:.2f} -> {m['tiled_ms']:.2f} "
                f"({t['model_k3_dedup']['tiled_ms']:.2f}) | {r['cur_fwd_bwd_ms']:.2f} / {t['fwd_bwd_ms']:.2f} | "
                f"{t['partition_ms']:.2f}, {t['gain_shared_sort_est_ms']:.2f} |"
            )
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default="", help="comma list of kernels (fwd,expert,dx) to sweep at T=65536, each d")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU interpreter check of this script)")
    ap.add_argument("--fp32-tables", action="store_true", help="also time fp32 tables with bf16 x")
    ap.add_argument("--no-torch", action="store_true", help="skip timing the pure-PyTorch backend")
    ap.add_argument("--no-atomic", action="store_true", help="skip the fp32-atomics alternative")
    ap.add_argument("--tiled", action="store_true", help="also time the tile-sorted forward prototype (step 7)")
    ap.add_argument("--only-tiled", action="store_true", help="step 7 only (with the copy bandwidth)")
    ap.add_argument("--tiles", default="4096,8192,16384", help="token tiles of step 7")
    ap.add_argument("--decode", action="store_true", help="time the forward at decoding sizes (step 8)")
    ap.add_argument("--only-decode", action="store_true", help="step 8 only (with --only-tiled: 7 and 8)")
    ap.add_argument("--readouts", action="store_true", help="also time the read-outs paper/linear/glu (step 9)")
    ap.add_argument("--only-readouts", action="store_true", help="step 9 only")
    ap.add_argument("--model", action="store_true", help="print the tiled forward's byte model and exit")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.model:
        print_tiled_model()
        return

    H, K = 8, 16
    if args.smoke:
        N, sizes, dims, corr, sweep_T = 256, [9, 16], [32], (16, 2, 3, 32, 256), 16
        H, K = 2, 3
    else:
        N, sizes, dims, corr, sweep_T = 1024**2, [4096, 16384, 65536], [512, 1024], (4096, 8, 16, 1024, 1024**2), 65536
    res = {"device": torch.cuda.get_device_name() if ON_GPU else "cpu", "torch": torch.__version__}
    res["triton"] = triton.__version__
    res["copy_tbps"] = copy_bandwidth()
    print(f"device {res['device']}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"copy bandwidth (read+write): {res['copy_tbps']:.2f} TB/s")

    if args.readouts or args.only_readouts:
        res["readouts"] = time_readouts(32 if args.smoke else 512, N, [9, 16] if args.smoke else [16384, 32768])
    if args.only_readouts:
        write_json(res, args.out)
        return
    if args.decode or args.only_decode:
        res["decode"] = time_decode(max(dims), N, sizes=(1, 2) if args.smoke else (1, 2, 8, 32))
    if args.only_tiled or args.only_decode:  # skip steps 2-6
        if args.only_tiled:
            res["tiled"] = run_tiled(args, corr, N, H, K, dims)
        write_json(res, args.out)
        return
    t0 = time.time()
    res["correctness"] = check_correctness(*corr)
    print("correctness:", json.dumps(res["correctness"]), f"({time.time() - t0:.0f} s)")
    if ON_GPU:
        torch.cuda.empty_cache()

    res["timings"], res["atomic"], res["sweep"], res["tuning_used"] = [], [], {}, {}
    kernels = [k for k in args.sweep.split(",") if k]
    for d in sorted(dims, reverse=True):
        tables = make_problem(1, 1, 1, d, N, seed=5)[1:3]
        if kernels:
            t0 = time.time()
            print(f"sweep d={d}:")
            res["sweep"][d] = sweep(sweep_T, H, K, d, N, tables, kernels)
            print(f"sweep took {time.time() - t0:.0f} s; chosen: {json.dumps(mixing.TUNING)}")
        res["tuning_used"][d] = json.loads(json.dumps(mixing.TUNING))
        for T in sizes:
            r = time_parts(T, H, K, d, N, tables)
            res["timings"].append(r)
            print(json.dumps(r))
            if ON_GPU:
                torch.cuda.empty_cache()
        if not args.no_atomic and d == max(dims):
            down, up = tables
            for T in sizes[-2:]:
                x, _, _, idx, gates, dy = make_problem(T, H, K, d, 1, seed=6)
                idx = torch.randint(0, N, (T, H, K), device=DEV)
                _, h = mixing._forward_impl(x, down, up, idx, gates, "gelu")
                ms = bench_ms(lambda: backward_atomic(dy, x, down, up, idx, gates, h))  # noqa: B023
                ref = mixing._backward_impl(dy, x, down, up, idx, gates, h, "gelu")
                got = backward_atomic(dy, x, down, up, idx, gates, h)
                errs = [rel_err(a.float(), b.float()) for a, b in zip(got, ref)]
                res["atomic"].append({"T": T, "d": d, "ms": ms, "rel_diff_vs_sorted": errs})
                print(f"atomic bwd T={T} d={d}: {ms:.2f} ms, rel diff vs sorted path {errs}")
                del ref, got, h
                if ON_GPU:
                    torch.cuda.empty_cache()
        if args.fp32_tables and d == max(dims):
            res["fp32_tables"] = time_fp32_tables(sizes[1], H, K, d, N)
        if not args.no_torch and d == max(dims):
            res["torch_backend"] = [time_torch_backend(T, H, K, d, N, tables) for T in sizes[:2]]
        del tables
    if args.tiled:
        res["tiled"] = run_tiled(args, corr, N, H, K, dims)
    path = write_json(res, args.out)

    print("\n| d | T | fwd ms | bwd ms (sort+expert+dx) | fwd+bwd ms | fwd TB/s | expert TB/s | dx TB/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["timings"]:
        print(
            f"| {r['d']} | {r['T']} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} "
            f"({r['sort_ms']:.2f}+{r['expert_ms']:.2f}+{r['dx_ms']:.2f}) | {r['fwd_bwd_ms']:.2f} | "
            f"{r['fwd_tbps']:.2f} | {r['expert_tbps']:.2f} | {r['dx_tbps']:.2f} | "
            f"{r.get('peak_above_params_gib', float('nan')):.2f} |"
        )
    c = res["correctness"]
    print("correctness pass:", c["bf16_full_size"]["pass"], c["fp32_ragged"]["pass"], c["bitwise_deterministic"])
    print("results in", path)


if __name__ == "__main__":
    main()
