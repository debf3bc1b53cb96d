"""PEER layer benchmark: time and memory of one FFW layer, forward and forward+backward.

Implementations (rows of the table):
  triton        torchpeer.PEER(backend="triton")  (Triton retrieval + Triton mixing + the fused
                Triton "ema" query norm)
  triton-refnorm  the same with the "ema" norm on its plain-PyTorch reference path (the layer as
                it was before the fused norm, issue 19)
  triton-graph  the "triton" layer with its forward and backward each replayed from a CUDA graph
                (torch.cuda.make_graphed_callables, captured per row): the GPU time of a step without
                the host's dispatch, which bounds small token counts (issue 19: at 4096 tokens the
                retrieval's fwd+bwd takes as long as at 16384). CUDA only.
  triton-touched  the "triton" layer with the mixing backward's expert pass over the touched experts
                only (TUNING["expert"]["touched_below"] = 1: table gradients zeroed by a memset, one
                program per touched expert, when T*S < N; NOTES_issue19.md section 22). Opt-in until
                this row shows it pays.
  torch         torchpeer.PEER(backend="torch")   (chunked PyTorch retrieval + mixing)
  peer-pytorch  lucidrains' PEER-pytorch 0.2.2, if importable (not a dependency)
  dense4d       the dense d -> 4d -> d GELU FFW a PEER layer replaces

--retrieval-forwards auto,threshold runs each Triton impl (triton, triton-refnorm) once per listed
retrieval forward (RetrievalKernelConfig.forward set on the layer's router.retrieval_config; "auto"
is the layer's default config), the rows of one shape next to each other, named by what ran
("triton (retrieval auto=queue)", "triton (retrieval threshold)"); the tables then also give each
row's time over the first listed forward's (section "Retrieval forwards compared"), within this run.

For each (impl, d_model, tokens): fwd_ms and fwd_bwd_ms are medians of CUDA-event timings
after warm-up (fwd runs with autograd on, as in training; fwd+bwd uses a random upstream
gradient and drops parameter gradients between steps), peak_gib is
torch.cuda.max_memory_allocated() over one fwd+bwd step minus the parameter bytes
(parameter gradients and activations are included). An OOM gives nulls and the run goes on.

Also measured: the device-to-device copy ceiling (copy_tbs, bytes read + written), each
Triton kernel's achieved bandwidth against the bytes it must move (see kernel_rows()), and the
layer's parts alone (part_rows(): retrieval fwd and fwd+bwd, the ema norm fused vs reference).

    python benchmarks/peer_layer.py                # the full run on one GPU (~5 min on an H200)
    python benchmarks/peer_layer.py --quick        # tiny sizes; runs on the CPU as a smoke test
    python benchmarks/peer_layer.py --impls triton,triton-refnorm,peer-pytorch,dense4d \
        --d-models 1024 --tokens 4096,65536 --no-optim      # issue 19's table (~3 min)
    python benchmarks/peer_layer.py --impls triton --retrieval-forwards auto,threshold \
        --d-models 1024 --tokens 4096,16384,65536 --no-optim   # the default vs the old one, one run

Writes <out-dir>/peer_layer_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from torchpeer.data.atomic import write_text_atomic  # noqa: E402
from torchpeer.experiments.results import code_version  # noqa: E402

IMPLS = ("triton", "triton-refnorm", "triton-graph", "triton-touched", "torch", "peer-pytorch", "dense4d")
# the rows --retrieval-forwards multiplies
TRITON_IMPLS = ("triton", "triton-refnorm", "triton-graph", "triton-touched")


# ---------------------------------------------------------------------------- timing


def commit_of(given: str | None = None) -> str:
    """The commit measured: ``given`` (--commit; on the device machine the tree has no .git), else
    the one results records name (torchpeer.experiments.results.code_version), else "nogit"."""
    return given or code_version()["commit"] or "nogit"


def run_info(device: torch.device) -> dict:
    """{gpu, torch, triton, date} of a benchmark run (the header of every results JSON)."""
    code = code_version()
    return {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": code["torch"],
        "triton": code["triton"],
        "date": datetime.date.today().isoformat(),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int = 2, reps: int | None = None, budget_s: float = 2.0):
    """Median milliseconds of fn() after warm-up. reps=None picks a count that fits budget_s."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if reps is None:  # one timed call sizes the repeat count: slow impls get few repeats
        t0 = time.perf_counter()
        fn()
        _sync(device)
        reps = int(min(20, max(3, budget_s / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def copy_tbs(device: torch.device, gib: float = 1.0) -> float | None:
    """Device-to-device copy bandwidth in TB/s, counting bytes read + written."""
    if device.type != "cuda":
        return None
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * src.numel() / (ms * 1e-3) / 1e12


# ---------------------------------------------------------------------------- implementations


class DenseFFW4d(nn.Module):
    """x: (tokens, d) -> (tokens, d) through d -> 4d -> d with GELU."""

    def __init__(self, d: int):
        super().__init__()
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x)))


class PeerPytorchAdapter(nn.Module):
    """lucidrains' PEER-pytorch takes (batch, seq, dim); feed our (tokens, d) as one sequence."""

    def __init__(self, d: int, cfg: dict):
        super().__init__()
        from PEER_pytorch import PEER as LucidPEER

        # its dim_key is the size of each *half* query (queries are dim_key * heads * 2 wide),
        # so our full d_key maps to dim_key = d_key // 2 for an equal key width.
        self.inner = LucidPEER(
            dim=d,
            heads=cfg["heads"],
            num_experts=cfg["n_experts"],
            num_experts_per_head=cfg["top_k"],
            dim_key=cfg["d_key"] // 2,
            non_competing_scores=False,  # softmax gates, as in the paper
        )

    def forward(self, x):
        return self.inner(x[None])[0]


def make_module(impl: str, d: int, cfg: dict) -> nn.Module:
    """Build one implementation; raises ImportError/RuntimeError when it is unavailable."""
    if impl == "dense4d":
        return DenseFFW4d(d)
    if impl == "peer-pytorch":
        return PeerPytorchAdapter(d, cfg)
    from torchpeer import PEER

    layer = PEER(
        d,
        n_experts=cfg["n_experts"],
        heads=cfg["heads"],
        top_k=cfg["top_k"],
        d_key=cfg["d_key"],
        backend="triton" if impl in TRITON_IMPLS else impl,
    )
    if impl == "triton-refnorm":
        layer.router.norm.backend = "torch"  # the ema norm's reference path, Triton everywhere else
    return layer


def unavailable_reason(impl: str, device: torch.device) -> str | None:
    """None if impl can run here, else a short note saying why not."""
    try:
        if impl == "peer-pytorch":
            import PEER_pytorch  # noqa: F401
        elif impl in (*TRITON_IMPLS, "torch"):
            from torchpeer import PEER  # noqa: F401
        if impl in TRITON_IMPLS:
            import triton  # noqa: F401

            if impl == "triton-graph" and device.type != "cuda":
                return "needs a CUDA device (CUDA graphs)"
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                return "needs a CUDA device (or TRITON_INTERPRET=1: the interpreter, slow)"
    except Exception as e:  # ImportError, or anything a half-installed package raises
        return f"import failed: {type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------- retrieval forwards


def retrieval_forward_choices() -> tuple[str, ...]:
    """The values --retrieval-forwards takes: RetrievalKernelConfig.forward's ("auto" first)."""
    from torchpeer.ops.retrieval.kernel_config import FORWARD_IMPLS

    return FORWARD_IMPLS


def retrieval_config_for(forward: str):
    """The router.retrieval_config a row sets: None (the layer's default config) for "auto", else
    RetrievalKernelConfig(forward=forward) with every other field at its default."""
    if forward == "auto":
        return None
    from torchpeer.ops import RetrievalKernelConfig

    return RetrievalKernelConfig(forward=forward)


def retrieval_label(forward: str, tokens: int, cfg: dict, dtype) -> str:
    """What the layer's retrieval runs at ``tokens`` tokens with config forward ``forward``: "auto=<the
    forward auto resolves to>" (forward_impl on the layer's (T, heads, d_key) queries and keys in
    ``dtype``), else the forward's own name."""
    if forward != "auto":
        return forward
    from torchpeer.ops.retrieval.kernel_config import DEFAULT_CONFIG
    from torchpeer.ops.retrieval.triton_op import forward_impl

    H, K, dk, n = cfg["heads"], cfg["top_k"], cfg["d_key"], math.isqrt(cfg["n_experts"])
    q = torch.empty(tokens, H, dk, dtype=dtype, device="meta")
    keys = torch.empty(1, 2, n, dk // 2, dtype=dtype, device="meta")
    return f"auto={forward_impl(q, keys, K, DEFAULT_CONFIG)}"


def row_label(row: dict) -> str:
    """The name of a row in the tables: its impl, and for the Triton impls the retrieval that ran."""
    return f"{row['impl']} (retrieval {row['retrieval']})" if row.get("retrieval") else row["impl"]


def retrieval_ratios(rows: list[dict], forwards) -> list[dict]:
    """For each Triton (impl, d_model, tokens) measured with the first listed forward and another one:
    the other's fwd_ms and fwd_bwd_ms over the first's (> 1: the first listed is faster). Pairs where
    neither time exists on both sides are left out."""
    if len(forwards) < 2:
        return []
    base = {(r["impl"], r["d_model"], r["tokens"]): r for r in rows if r.get("retrieval_forward") == forwards[0]}
    out = []
    for r in rows:
        b = base.get((r["impl"], r["d_model"], r["tokens"]))
        if b is None or r.get("retrieval_forward") in (None, forwards[0]):
            continue
        ratio = {k: round(r[k] / b[k], 4) if r.get(k) and b.get(k) else None for k in ("fwd_ms", "fwd_bwd_ms")}
        if all(v is None for v in ratio.values()):
            continue
        out.append(
            {
                "impl": r["impl"],
                "d_model": r["d_model"],
                "tokens": r["tokens"],
                "first": row_label(b),
                "other": row_label(r),
                "fwd_ratio": ratio["fwd_ms"],
                "fwd_bwd_ratio": ratio["fwd_bwd_ms"],
            }
        )
    return out


# ---------------------------------------------------------------------------- one row


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def empty_row(impl: str, d: int, tokens: int, cfg: dict, dtype) -> dict:
    routed = impl != "dense4d"
    return {
        "impl": impl,
        "d_model": d,
        "n_experts": cfg["n_experts"] if routed else None,
        "heads": cfg["heads"] if routed else None,
        "top_k": cfg["top_k"] if routed else None,
        "tokens": tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "fwd_ms": None,
        "fwd_bwd_ms": None,
        "peak_gib": None,
    }


class _Wrapped(nn.Module):
    """``module`` behind a forward of its own, for make_graphed_callables to replace (not module's)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


def measure_row(module: nn.Module, row: dict, device, dtype, budget_s: float) -> dict:
    """Fill row's fwd_ms, fwd_bwd_ms, peak_gib for module on row["tokens"] tokens."""
    if row["impl"] == "triton-touched":  # the opt-in expert pass, for this row only
        from torchpeer.ops.expert_mixing import triton_op

        before = dict(triton_op.TUNING["expert"])
        triton_op.TUNING["expert"]["touched_below"] = 1.0
        try:
            return _measure_row(module, row, device, dtype, budget_s)
        finally:
            triton_op.TUNING["expert"] = before
    return _measure_row(module, row, device, dtype, budget_s)


def _measure_row(module: nn.Module, row: dict, device, dtype, budget_s: float) -> dict:
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    x = dy = None
    layer = module
    try:
        x = torch.randn(row["tokens"], row["d_model"], device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        if row["impl"] == "triton-graph":
            # capture this row's shape: forward and backward each become one graph replay (the capture's
            # warm-up steps run the layer eagerly first, so capture-time choices such as the segment
            # split are made as in training); the graphs' memory pool is freed with `layer` below.
            # A fresh wrapper per row: make_graphed_callables replaces the forward of the module it is
            # given, so graphing `module` itself kept the first row's shape for every later row (the
            # 16384- and 65536-token rows failed on 2026-12-06: "size of tensor a (4096) must match")
            layer = torch.cuda.make_graphed_callables(_Wrapped(module), (x,))

        def fwd():
            return layer(x)

        def fwd_bwd():
            module.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(dy)

        row["fwd_ms"] = round(time_ms(fwd, device, budget_s=budget_s), 4)
        row["fwd_bwd_ms"] = round(time_ms(fwd_bwd, device, budget_s=budget_s), 4)
        if device.type == "cuda":
            module.zero_grad(set_to_none=True)
            x.grad = None
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            fwd_bwd()
            _sync(device)
            row["peak_gib"] = round((torch.cuda.max_memory_allocated(device) - param_bytes) / 2**30, 4)
    except Exception as e:
        if not _is_oom(e):
            raise
        row["note"] = "out of memory"
    finally:
        module.zero_grad(set_to_none=True)
        x = dy = layer = None  # free before the next row (a graphed layer holds its graphs' pool)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------- kernel bandwidth


def kernel_rows(d: int, tokens: int, cfg: dict, device, dtype, copy: float | None, retrieval_configs=()) -> list[dict]:
    """Each Triton kernel timed alone, against the bytes it must move (S = heads * top_k
    selections per token, row = d * element size, int64 indices, fp32 scores/gates/h):

    retrieval:  read queries (T*H*d_key) and both sub-key tables; write scores (4 B) and
                indices (8 B) for T*S selections. (It is compute-bound: sorting networks.)
    mixing_fwd: read x (T rows), T*S gathered u rows and v rows, indices + gates; write y
                (T rows) and h (T*S fp32).
    mixing_bwd: read x, dy, T*S u and v rows again for dx, indices, gates, h; write dx,
                dgates, and the dense du, dv tables (2*N rows: the gradients are dense tensors).

    retrieval_configs: extra (BLOCK_M, BLOCK_N, num_warps) launch configs of the "merge" retrieval
    kernel to time as well (rows "retrieval@BMxBNxW", each with RetrievalKernelConfig(forward="merge",
    merge_half=...)). Before the ops split these only set the merge tuning while bf16 inputs ran the
    "threshold" kernel, so such rows of older results timed the default config.
    """
    from torchpeer.ops import RetrievalKernelConfig
    from torchpeer.ops.retrieval.triton_op import forward_impl, product_key_topk_triton

    H, K, dk, N = cfg["heads"], cfg["top_k"], cfg["d_key"], cfg["n_experts"]
    n = math.isqrt(N)
    el = torch.finfo(dtype).bits // 8
    sel, row = tokens * H * K, d * el
    rows = []

    def add(name, ms, nbytes):
        tbs = nbytes / (ms * 1e-3) / 1e12
        rows.append(
            {
                "kernel": name,
                "d_model": d,
                "tokens": tokens,
                "ms": round(ms, 4),
                "bytes": int(nbytes),
                "tbs": round(tbs, 4),
                "frac_of_copy": round(tbs / copy, 4) if copy else None,
            }
        )

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(tokens, H, dk, device=device, dtype=dtype, generator=g)
    keys = torch.randn(1, 2, n, dk // 2, device=device, dtype=dtype, generator=g)
    ms = time_ms(lambda: product_key_topk_triton(q, keys, K), device, warmup=2, reps=10)
    retrieval_bytes = tokens * H * dk * el + keys.numel() * el + sel * (4 + 8)
    add(f"retrieval (auto={forward_impl(q, keys, K, RetrievalKernelConfig())})", ms, retrieval_bytes)
    for c in retrieval_configs:
        config = RetrievalKernelConfig(forward="merge", merge_half=tuple(c))
        ms = time_ms(lambda config=config: product_key_topk_triton(q, keys, K, config), device, warmup=2, reps=10)
        add("retrieval@" + "x".join(map(str, c)), ms, retrieval_bytes)
    scores, indices = product_key_topk_triton(q, keys, K)
    gates = torch.softmax(scores, dim=-1)  # fp32, as in the layer
    q = keys = scores = None  # free

    try:
        from torchpeer.ops.expert_mixing.triton_op import expert_mix_triton as peer_mix_triton
    except Exception as e:
        rows.append({"kernel": "mixing", "note": f"import failed: {type(e).__name__}: {e}"})
        return rows
    x = torch.randn(tokens, d, device=device, dtype=dtype, generator=g, requires_grad=True)
    down = (torch.randn(N, d, device=device, dtype=dtype, generator=g) / math.sqrt(d)).requires_grad_()
    up = torch.randn(N, d, device=device, dtype=dtype, generator=g).requires_grad_()
    gates.requires_grad_()
    with torch.no_grad():
        ms = time_ms(lambda: peer_mix_triton(x, down, up, indices, gates, "gelu"), device, reps=10)
    add("mixing_fwd", ms, 2 * sel * row + 2 * tokens * row + sel * (8 + 4 + 4))
    y = peer_mix_triton(x, down, up, indices, gates, "gelu")
    dy = torch.randn_like(y)

    def bwd():
        torch.autograd.grad(y, (x, down, up, gates), dy, retain_graph=True)

    ms = time_ms(bwd, device, reps=10)
    add("mixing_bwd", ms, 3 * sel * row + 3 * tokens * row + 2 * N * row + sel * (8 + 4 + 4 + 4))
    return rows


# ---------------------------------------------------------------------------- parts


def part_rows(token_counts, cfg: dict, device, dtype, budget_s: float) -> list[dict]:
    """The layer's parts alone, at each token count, as the layer runs them (bf16 module):
    retrieval (Triton, default config, named by the forward "auto" takes at that T, and with
    forward="threshold", auto's choice before 2026-12-05 ("queue" from queue_tokens bf16 tokens since);
    fwd without autograd, fwd+bwd with gradients for queries and keys) and the ema query norm in train
    mode (fused Triton vs the reference path; bf16 queries, parameters and buffers, fp32 statistics)."""
    from torchpeer.layers.query_norm import EMAQueryNorm
    from torchpeer.ops import RetrievalKernelConfig
    from torchpeer.ops.retrieval.triton_op import forward_impl, product_key_topk_triton

    H, K, dk, n = cfg["heads"], cfg["top_k"], cfg["d_key"], math.isqrt(cfg["n_experts"])
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for T in token_counts:
        q = torch.randn(T, H, dk, device=device, dtype=dtype, generator=g).requires_grad_()
        keys = torch.randn(1, 2, n, dk // 2, device=device, dtype=dtype, generator=g).requires_grad_()
        ds = torch.randn(T, H, K, device=device, generator=g)
        auto = f"retrieval (auto={forward_impl(q, keys, K, RetrievalKernelConfig())})"
        parts = [
            (name, lambda q=q, keys=keys, c=c: product_key_topk_triton(q, keys, K, c)[0])
            for name, c in ((auto, None), ("retrieval (threshold fwd)", RetrievalKernelConfig(forward="threshold")))
        ]
        for backend in ("triton", "torch"):
            norm = EMAQueryNorm(H, dk, backend=backend).to(device=device, dtype=dtype).train()
            parts.append((f"ema norm ({'fused' if backend == 'triton' else 'reference'})", lambda q=q, m=norm: m(q)))
        for name, fn in parts:
            row = {"part": name, "tokens": T, "dtype": str(dtype).replace("torch.", "")}
            try:
                with torch.no_grad():
                    row["fwd_ms"] = round(time_ms(fn, device, budget_s=budget_s), 4)
                up = ds if name.startswith("retrieval") else torch.randn_like(q)

                def fwd_bwd(fn=fn, up=up, leaves=(q, keys)):
                    for t in leaves:
                        t.grad = None
                    fn().backward(up)

                row["fwd_bwd_ms"] = round(time_ms(fwd_bwd, device, budget_s=budget_s), 4)
            except Exception as e:
                if not _is_oom(e):
                    traceback.print_exc()
                row["note"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        q = keys = ds = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------- optimizer step


def optim_rows(d: int, token_counts, cfg: dict, device, dtype) -> list[dict]:
    """One optimizer step on a PEER layer's gradients: dense AdamW (torch's default foreach
    implementation, and fused=True on CUDA) vs SparseRowAdamW, which updates only the rows of
    down/up that the step retrieved (touched_frac of the N rows) and dense-updates the rest."""
    from torchpeer import PEER, SparseRowAdamW

    backend = "triton" if device.type == "cuda" else "torch"
    with device:
        module = PEER(d, cfg["n_experts"], cfg["heads"], cfg["top_k"], cfg["d_key"], backend=backend).to(dtype=dtype)
    out = []
    for tokens in token_counts:
        row = {"d_model": d, "tokens": tokens, "n_experts": cfg["n_experts"], "dtype": str(dtype).replace("torch.", "")}
        try:
            x = torch.randn(tokens, d, device=device, dtype=dtype)
            module.zero_grad(set_to_none=True)
            module(x).backward(torch.randn_like(x))
            with torch.no_grad():
                _, indices = module.retrieve(x)
            rows = indices.flatten()
            row["touched_frac"] = round(rows.unique().numel() / cfg["n_experts"], 4)
            variants = [("adamw_ms", lambda: torch.optim.AdamW(module.parameters(), lr=1e-4))]
            if device.type == "cuda":
                variants.append(("adamw_fused_ms", lambda: torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)))
            variants.append(("sparse_row_adamw_ms", lambda: SparseRowAdamW(module.parameters(), lr=1e-4)))
            for name, make in variants:
                opt = make()
                if isinstance(opt, SparseRowAdamW):
                    table_rows = {module.down: rows, module.up: rows}
                    step = lambda opt=opt, r=table_rows: opt.step(rows=r)  # noqa: E731
                    row[name] = round(time_ms(step, device, warmup=1, reps=5), 4)
                else:
                    row[name] = round(time_ms(opt.step, device, warmup=1, reps=5), 4)
                opt = None  # free its moments before the next one
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        except Exception as e:
            if not _is_oom(e):
                raise
            row["note"] = "out of memory"
        x = indices = rows = None
        out.append(row)
        print(json.dumps(row), flush=True)
    module = None
    return out


def auto_forward_note(token_counts, cfg: dict, dtype) -> str:
    """The forward the default RetrievalKernelConfig ("auto") resolves to at each token count for the
    layer's (T, heads, d_key) queries in ``dtype`` ("queue" from queue_tokens bf16 tokens since 2026-12-05)."""
    from torchpeer.ops.retrieval.kernel_config import DEFAULT_CONFIG
    from torchpeer.ops.retrieval.triton_op import forward_impl

    H, K, dk, n = cfg["heads"], cfg["top_k"], cfg["d_key"], math.isqrt(cfg["n_experts"])
    keys = torch.empty(1, 2, n, dk // 2, dtype=dtype, device="meta")
    picks = [f"{forward_impl(torch.empty(T, H, dk, dtype=dtype, device='meta'), keys, K, DEFAULT_CONFIG)} at {T}"
             for T in token_counts]  # fmt: skip
    return "triton retrieval forward (auto): " + ", ".join(picks) + " tokens"


# ---------------------------------------------------------------------------- output


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def markdown(result: dict) -> str:
    lines = [
        f"# PEER layer benchmark, {result['date']}",
        "",
        f"GPU: {result['gpu']}; torch {result['torch']}; triton {result['triton']}; commit {result.get('commit')}; "
        f"copy ceiling {_fmt(result['copy_tbs'])} TB/s (read + write).",
        "",
        "fwd: forward with autograd on; fwd+bwd: forward + backward with a random upstream gradient; "
        "peak: max allocated during fwd+bwd minus parameter bytes (GiB).",
        "",
        "| impl | d_model | n_experts | heads | top_k | tokens | dtype | fwd ms | fwd+bwd ms | peak GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        cells = [row_label(r), r["d_model"], r["n_experts"] or "-", r["heads"] or "-", r["top_k"] or "-"]
        miss = "OOM" if r.get("note") == "out of memory" else "n/a"
        times = [f"{v:.3f}" if v is not None else miss for v in (r["fwd_ms"], r["fwd_bwd_ms"], r["peak_gib"])]
        cells += [r["tokens"], r["dtype"], *times]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if result.get("retrieval_ratios"):
        lines += ["", "## Retrieval forwards compared (this run; ratio = row / first listed, > 1: first faster)", ""]
        lines += [
            "| first listed | other | d_model | tokens | fwd ratio | fwd+bwd ratio |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for c in result["retrieval_ratios"]:
            cells = [c["first"], c["other"], c["d_model"], c["tokens"], _fmt(c["fwd_ratio"]), _fmt(c["fwd_bwd_ratio"])]
            lines.append("| " + " | ".join(str(v) for v in cells) + " |")
    if result.get("kernels"):
        lines += ["", "## Triton kernels alone", ""]
        lines += [
            "| kernel | d_model | tokens | ms | counted GB | TB/s | of copy |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for k in result["kernels"]:
            if "ms" not in k:
                lines.append(f"| {k['kernel']} | {k.get('note', '')} | | | | | |")
                continue
            lines.append(
                f"| {k['kernel']} | {k['d_model']} | {k['tokens']} | {k['ms']:.3f} | "
                f"{k['bytes'] / 1e9:.4g} | {k['tbs']:.3f} | {_fmt(k['frac_of_copy'])} |"
            )
    if result.get("parts"):
        lines += ["", "## The layer's parts alone (ms)", ""]
        lines += ["| part | tokens | dtype | fwd ms | fwd+bwd ms | note |", "| --- | ---: | --- | ---: | ---: | --- |"]
        for r in result["parts"]:
            cells = [r["part"], r["tokens"], r["dtype"], _fmt(r.get("fwd_ms")), _fmt(r.get("fwd_bwd_ms"))]
            lines.append("| " + " | ".join(str(c) for c in cells) + f" | {r.get('note', '')} |")
    if result.get("optim"):
        lines += ["", "## Optimizer step on a PEER layer's gradients (ms)", ""]
        lines += [
            "| d_model | tokens | rows touched | AdamW | AdamW fused | SparseRowAdamW |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for o in result["optim"]:
            cells = [o["d_model"], o["tokens"], _fmt(o.get("touched_frac"))]
            cells += [_fmt(o.get(k)) for k in ("adamw_ms", "adamw_fused_ms", "sparse_row_adamw_ms")]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--commit", default=None, help="the commit measured (default: git rev-parse here, if git works)")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of " + ",".join(IMPLS))
    p.add_argument("--no-kernels", action="store_true", help="skip the per-kernel bandwidth section")
    p.add_argument("--no-optim", action="store_true", help="skip the optimizer-step section")
    p.add_argument("--no-parts", action="store_true", help="skip the parts section (retrieval, ema norm alone)")
    p.add_argument("--d-models", default=None, help="comma-separated d_model values (default 512,1024; quick 32,64)")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default 4096,16384,65536)")
    p.add_argument(
        "--retrieval-configs",
        default="",
        help="extra 'merge' retrieval launch configs to time, 'BM,BN,WARPS;BM,BN,WARPS' (bf16, top_k <= 16)",
    )
    p.add_argument(
        "--retrieval-forwards",
        default="auto",
        help=f"comma-separated RetrievalKernelConfig.forward values, each run on the Triton impls "
        f"({', '.join(TRITON_IMPLS)}) as its own row, e.g. 'auto,threshold' (the default vs auto's pick "
        "before 2026-12-05); rows are named '<impl> (retrieval auto=<what auto ran>)' / '<impl> (retrieval "
        "<forward>)' and compared as ratios to the first listed; one of: "
        f"{', '.join(retrieval_forward_choices())} (default: auto)",
    )
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    if args.quick:
        cfg = dict(n_experts=16**2, heads=2, top_k=4, d_key=16)
        d_models, token_counts, budget_s = (32, 64), (64, 256), 0.2
    else:
        cfg = dict(n_experts=1024**2, heads=8, top_k=16, d_key=128)
        d_models, token_counts, budget_s = (512, 1024), (4096, 16384, 65536), 1.0
    if args.d_models:
        d_models = tuple(int(v) for v in args.d_models.split(","))
    if args.tokens:
        token_counts = tuple(int(v) for v in args.tokens.split(","))
    try:
        sweep = [tuple(int(v) for v in c.split(",")) for c in args.retrieval_configs.split(";") if c.strip()]
        if any(len(c) != 3 for c in sweep):
            raise ValueError
    except ValueError:
        p.error(f"--retrieval-configs must look like '64,128,16;32,64,8', got {args.retrieval_configs!r}")
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        p.error(f"unknown impls {bad}; choose from {', '.join(IMPLS)}")
    forwards = [f.strip() for f in args.retrieval_forwards.split(",") if f.strip()]
    allowed = retrieval_forward_choices()
    bad = [f for f in forwards if f not in allowed]
    if bad or not forwards or len(set(forwards)) != len(forwards):
        p.error(
            f"--retrieval-forwards takes distinct values from {', '.join(allowed)}, "
            f"got {args.retrieval_forwards!r}" + (f" (unknown: {', '.join(bad)})" if bad else "")
        )
    if forwards != ["auto"] and not set(impls) & set(TRITON_IMPLS):
        p.error(f"--retrieval-forwards applies to the Triton impls ({', '.join(TRITON_IMPLS)}); add one to --impls")

    result = {
        **run_info(device),
        "commit": commit_of(args.commit),
        "copy_tbs": None,
        "config": {**cfg, "quick": args.quick},
        "retrieval_forwards": forwards,
        "rows": [],
        "retrieval_ratios": [],
        "kernels": [],
        "parts": [],
        "optim": [],
        "notes": [],
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"peer_layer_{result['date']}")

    def save() -> None:  # after every row, so a run cut short still leaves its results
        result["retrieval_ratios"] = retrieval_ratios(result["rows"], forwards)
        write_text_atomic(stem + ".json", json.dumps(result, indent=2) + "\n")
        write_text_atomic(stem + ".md", markdown(result))

    t_start = time.perf_counter()
    result["copy_tbs"] = copy_tbs(device)
    if result["copy_tbs"]:
        result["copy_tbs"] = round(result["copy_tbs"], 4)
        print(f"copy ceiling: {result['copy_tbs']:.3f} TB/s", flush=True)

    # which retrieval forward the layer's default config ("auto") runs, per token count
    if "triton" in impls and unavailable_reason("triton", device) is None:
        result["notes"].append(auto_forward_note(token_counts, cfg, dtype))
    for impl in impls:
        reason = unavailable_reason(impl, device)
        if reason:
            note = f"{impl} skipped: {reason}"
            result["notes"].append(note)
            print(note, flush=True)
            continue
        for d in d_models:
            module, build_error = None, None
            try:
                torch.manual_seed(0)
                with device:  # initialise the (large) tables on the device, not on the CPU
                    module = make_module(impl, d, cfg).to(dtype=dtype)
            except Exception as e:
                build_error = "out of memory" if _is_oom(e) else f"{type(e).__name__}: {e}"
                traceback.print_exc()
            # the Triton impls once per retrieval forward, a shape's rows one after the other
            row_forwards = [(f, retrieval_config_for(f)) for f in forwards] if impl in TRITON_IMPLS else [(None, None)]
            for tokens in token_counts:
                for forward, config in row_forwards:
                    row = empty_row(impl, d, tokens, cfg, dtype)
                    if forward is not None:
                        row["retrieval_forward"] = forward
                        row["retrieval"] = retrieval_label(forward, tokens, cfg, dtype)
                        row["label"] = row_label(row)
                    if module is None:
                        row["note"] = f"build failed: {build_error}"
                    else:
                        try:
                            if forward is not None:
                                module.router.retrieval_config = config
                            measure_row(module, row, device, dtype, budget_s)
                        except Exception as e:  # a broken impl must not lose the other rows
                            traceback.print_exc()
                            row["note"] = f"{type(e).__name__}: {e}"
                    result["rows"].append(row)
                    save()
                    print(json.dumps(row), f"[{time.perf_counter() - t_start:.0f}s]", flush=True)
            module = None
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if device.type == "cuda" and "triton" in impls and not args.no_kernels:
        for d in d_models:
            try:
                extra = sweep if d == d_models[0] else ()
                result["kernels"] += kernel_rows(d, token_counts[-1], cfg, device, dtype, result["copy_tbs"], extra)
            except Exception as e:
                if not _is_oom(e):
                    traceback.print_exc()
                result["notes"].append(f"kernel timing at d_model={d} failed: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
        for k in result["kernels"]:
            print(json.dumps(k), flush=True)

    if device.type == "cuda" and not args.no_parts:
        try:
            result["parts"] = part_rows(token_counts, cfg, device, dtype, budget_s)
        except Exception as e:
            traceback.print_exc()
            result["notes"].append(f"parts failed: {type(e).__name__}: {e}")
        save()

    if not args.no_optim and unavailable_reason("torch", device) is None:
        for d in d_models:
            try:
                result["optim"] += optim_rows(d, token_counts, cfg, device, dtype)
            except Exception as e:
                traceback.print_exc()
                result["notes"].append(f"optimizer timing at d_model={d} failed: {type(e).__name__}: {e}")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    save()
    print(f"wrote {stem}.json and .md in {time.perf_counter() - t_start:.0f}s", flush=True)
    return result


if __name__ == "__main__":
    main()
