"""Decoding benchmark (issue 19): `torchpeer generate`'s path (the KV cache) for gpu-peer-small
against its dense twin gpu-dense-small, random weights (no checkpoint), one GPU.

Part 1, generate rows: torchpeer.lm.generate.generate (the function `torchpeer generate` calls,
temperature 0.8 as its CLI default, no streaming) on a random prompt of --prompt tokens, batch 1
and 32, --new-tokens new tokens. The configs' seq_len is 512, so a 512-token prompt is cut to its
last 256 tokens (generate's sliding window) and the 256 new tokens are 1 prefill + 255 one-token
steps. Per row: total_ms (CUDA events around the whole call, median of --repeats after a warm-up
call), prefill_ms (the same with 1 new token), ms_per_token = (total - prefill) / (new - 1) (the
decode step), tokens_per_s = batch * new / total, decode_tokens_per_s = batch / ms_per_token, and
graph_step_ms: one decode step (one token per row, cache half full) captured in a CUDA graph and
replayed, i.e. the GPU time of a step without Python/launch overhead (null if capture fails).
Variants: "fp32 graph" / "bf16 graph" (CUDA) decode with generate(decode="graph"): each one-token step
replayed from a CUDA graph on the static cache (torchpeer/lm/decode_graph.py); their ms_per_token is
(total - total with 2 new tokens) / (new - 2), so the capture at the first step is left out and
reported as capture_ms.
Variants: "fp32" is generate's own path (the CLI runs the model in fp32, no autocast); "bf16" runs
it under bf16 autocast; PEER also runs with the retrieval's large-token kernels ("fp32 large-T
retrieval": RetrievalKernelConfig(small_tokens=0)) and with both that and the ema norm's reference
path ("fp32 before issue 19"), so the decode-path changes are measured in the same run.
Part 2, op rows at decode sizes (H 8, n 1024, d_key 128, k 16; d_model 512): retrieval alone per
forward algorithm and the torch backend, the PEER layer's eval forward, and the mixing op (Triton
vs torch): eager_ms (per call, launches included) and graph_ms (per call inside a CUDA graph).

Row order: for each variant (the graph ones first: they are the path to serve with), each batch,
each config in turn, so that a run cut short (or stopped by --budget-s) still holds PEER beside
dense at the same settings; --configs and --variants pick rows.

    python benchmarks/decode.py --out-dir benchmarks/results --commit <sha>   # one GPU (~3 min)
    python benchmarks/decode.py --variants 'bf16 graph,fp32 graph,bf16' --budget-s 60 --no-ops   # short lease
    python benchmarks/decode.py --quick --out-dir /tmp/decode                  # tiny, CPU smoke test

Writes <out-dir>/decode_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from benchmarks.lm_throughput import VOCAB, lm_overrides  # noqa: E402
from benchmarks.peer_layer import commit_of, run_info, time_ms  # noqa: E402
from torchpeer.data.atomic import write_text_atomic  # noqa: E402

CONFIGS = ("gpu-dense-small", "gpu-peer-small")  # the default pair
# also allowed: issue 18's winner (issue 19: "the PEER configuration that ships as the recommended one")
MORE_CONFIGS = ("gpu-peer-multi-tuned-small",)


def graph_ms(fn, device, inner: int = 10, repeats: int = 5) -> float | None:
    """ms per fn() call inside a CUDA graph of `inner` calls (GPU time, no launch overhead); None off
    CUDA. Raises what the capture raises (e.g. a host sync inside fn)."""
    if device.type != "cuda":
        return None
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    return time_ms(g.replay, device, warmup=1, reps=repeats) / inner


# ---------------------------------------------------------------------------- generate rows


def build_model(config: str, device, quick: bool):
    from torchpeer.lm.config_io import load_config
    from torchpeer.lm.model import TransformerLM

    cfg = load_config(config, lm_overrides(config, quick))
    torch.manual_seed(0)
    with device:
        model = TransformerLM(cfg.model)
    return model.eval(), cfg


def peer_layers(model):
    from torchpeer import PEER

    return [m for m in model.modules() if isinstance(m, PEER)]


def set_variant(model, variant: str) -> None:
    """Large-token retrieval kernels and/or the ema norm's reference path on every PEER layer."""
    from torchpeer.ops import RetrievalKernelConfig

    old_retrieval = "large-T" in variant or "before" in variant
    for layer in peer_layers(model):
        layer.router.retrieval_config = RetrievalKernelConfig(small_tokens=0) if old_retrieval else None
        if hasattr(layer.router.norm, "backend"):
            layer.router.norm.backend = "torch" if "before" in variant else layer.router.backend


# every variant, in the order rows are run: the CUDA-graph decode first (the path to serve with), then
# generate's eager path, then PEER's before-and-after variants of issue 19
VARIANTS = ("bf16 graph", "fp32 graph", "fp32", "bf16", "fp32 large-T retrieval", "fp32 before issue 19")


def variants_of(config: str, device) -> list[str]:
    """The variants that apply to config on device (graph ones need CUDA; the last two need PEER)."""
    out = [v for v in VARIANTS if device.type == "cuda" or "graph" not in v]
    if "peer" not in config or device.type != "cuda":
        out = [v for v in out if v in ("bf16 graph", "fp32 graph", "fp32", "bf16")]
    return out


def _pick(text: str | None, allowed, what: str, default=None) -> list[str]:
    """A comma list of names from `allowed`, in allowed's order (None: `default`, or all of them)."""
    if text is None:
        return list(allowed if default is None else default)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"decode.py: unknown {what} {bad or text!r}; choose from: {', '.join(allowed)}")
    return [a for a in allowed if a in names]


def generate_row(model, cfg, config, variant, batch, prompt, new_tokens, repeats, device) -> dict:
    from torchpeer.lm.generate import generate
    from torchpeer.lm.model import KVCache

    set_variant(model, variant)
    row = {"config": config, "variant": variant, "batch": batch, "prompt": prompt, "new_tokens": new_tokens}
    gen = torch.Generator(device=device).manual_seed(0)
    idx = torch.randint(0, VOCAB, (batch, prompt), device=device, generator=gen)
    bf16 = variant.startswith("bf16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    decode = "graph" if variant.endswith("graph") else "eager"

    def run(n):
        with autocast:
            return generate(model, idx, n, temperature=0.8, generator=gen, decode=decode)

    row["total_ms"] = round(time_ms(lambda: run(new_tokens), device, warmup=1, reps=repeats), 3)
    row["prefill_ms"] = round(time_ms(lambda: run(1), device, warmup=1, reps=repeats), 3)
    row["ms_per_token"] = round((row["total_ms"] - row["prefill_ms"]) / max(1, new_tokens - 1), 4)
    if decode == "graph":  # each generate call captures its graph at its first step: keep that out of ms/token
        two = time_ms(lambda: run(2), device, warmup=1, reps=repeats)
        row["ms_per_token"] = round((row["total_ms"] - two) / max(1, new_tokens - 2), 4)
        row["capture_ms"] = round(two - row["prefill_ms"] - row["ms_per_token"], 3)
    row["tokens_per_s"] = round(batch * new_tokens / (row["total_ms"] / 1e3), 1)
    row["decode_tokens_per_s"] = round(batch / (row["ms_per_token"] / 1e3), 1) if row["ms_per_token"] > 0 else None
    try:  # one decode step in a CUDA graph: its GPU time
        window = cfg.model.seq_len
        cache = KVCache(cfg.model, batch, window, device, model.tok_emb.weight.dtype)
        # no autocast weight cache inside a graph capture (its cached casts would live outside the graph)
        no_cache = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False)
        with torch.no_grad(), no_cache:
            model(idx[:, -(window // 2) :], cache=cache, last_only=True)
            pos, step = cache.pos, idx[:, -1:]

            def one_step():
                cache.pos = pos
                model(step, cache=cache, last_only=True)

            ms = graph_ms(one_step, device)
        row["graph_step_ms"] = None if ms is None else round(ms, 4)
    except Exception as e:  # a capture failure is a finding, not a crash
        row["graph_step_ms"] = None
        row["note"] = f"graph capture failed: {type(e).__name__}: {str(e)[:200]}"
    return row


# ---------------------------------------------------------------------------- op rows


def op_rows(device, quick: bool, repeats: int) -> list[dict]:
    """Retrieval, the PEER layer's eval forward and the mixing op at decode token counts."""
    from torchpeer import PEER
    from torchpeer.ops import RetrievalKernelConfig, dispatch, expert_mix, product_key_topk

    triton_ok = dispatch.triton_unavailable_reason(device) is None
    H, n, dk, k, d = (2, 16, 16, 4, 32) if quick else (8, 1024, 128, 16, 512)
    tokens = (1, 4) if quick else (1, 8, 32, 64, 128, 256)
    rows = []

    def add(what, T, dtype, fn):
        row = {"what": what, "tokens": T, "dtype": str(dtype).replace("torch.", "")}
        try:
            with torch.no_grad():
                row["eager_ms"] = round(time_ms(fn, device, warmup=2, reps=repeats * 4), 4)
                ms = graph_ms(fn, device)
                row["graph_ms"] = None if ms is None else round(ms, 4)
        except Exception as e:
            traceback.print_exc()
            row["note"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)

    g = torch.Generator(device=device).manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        keys = torch.randn(1, 2, n, dk // 2, device=device, generator=g).to(dtype)
        for T in tokens:
            q = torch.randn(T, H, dk, device=device, generator=g).to(dtype)
            add("retrieval torch", T, dtype, lambda q=q, kk=keys: product_key_topk(q, kk, k, backend="torch"))
            if not triton_ok:
                continue
            for algo in ("split", "merge", "threshold"):
                cfg = RetrievalKernelConfig(forward=algo)
                add(f"retrieval {algo}", T, dtype, lambda q=q, kk=keys, c=cfg: product_key_topk(q, kk, k, config=c))
    torch.manual_seed(0)
    with device:
        layer = PEER(d, n_experts=n * n, heads=H, top_k=k, d_key=dk).eval()
    for T in tokens[:1] + tokens[2:3]:
        x = torch.randn(T, d, device=device, generator=g)
        for variant in ("default", "large-T retrieval", "before issue 19"):
            if variant != "default" and not triton_ok:
                continue
            layer.router.retrieval_config = RetrievalKernelConfig(small_tokens=0) if variant != "default" else None
            layer.router.norm.backend = "torch" if variant == "before issue 19" else layer.backend
            add(f"PEER layer eval fwd ({variant})", T, torch.float32, lambda x=x: layer(x))
        layer.router.retrieval_config, layer.router.norm.backend = None, layer.backend
        with torch.no_grad():
            _, idx = layer.retrieve(x)
            gates = torch.rand(idx.shape, device=device, generator=g)
        for backend in ("torch", "triton") if triton_ok else ("torch",):

            def mix(x=x, i=idx, gt=gates, b=backend):
                return expert_mix(x, layer.down, layer.up, i, gt, backend=b)

            add(f"mixing {backend}", T, torch.float32, mix)
    return rows


# ---------------------------------------------------------------------------- output


def _cell(v):
    return "n/a" if v is None else v


def markdown(result: dict) -> str:
    lines = [
        f"# Decoding benchmark, {result['date']}",
        "",
        f"Device: {result['gpu']}; torch {result['torch']}; triton {result['triton']}; commit {result['commit']}.",
        f"Random weights, prompt {result['prompt']} tokens, {result['new_tokens']} new tokens (temperature 0.8); "
        "medians of CUDA events (wall clock on the CPU). ms/token = (total - prefill) / (new - 1); "
        'graph step = one decode step replayed from a CUDA graph (GPU time only); "graph" variants decode '
        'with generate(decode="graph") (ms/token without the first step\'s capture, capture_ms in the JSON).',
        "",
        "| config | variant | batch | tokens/s | decode tokens/s | ms/token | prefill ms | total ms | graph step ms |"
        " vs dense (tokens/s) | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    dense = {(r["batch"], r["variant"]): r.get("tokens_per_s") for r in result["rows"] if "dense" in r["config"]}
    for r in result["rows"]:
        # PEER's own variants (large-T retrieval, before issue 19) against the dense row of their precision
        base = dense.get((r["batch"], r["variant"])) or dense.get((r["batch"], r["variant"][:4]))
        ratio = round(r["tokens_per_s"] / base, 3) if base and r.get("tokens_per_s") else None
        cells = [r["config"], r["variant"], r["batch"], r.get("tokens_per_s"), r.get("decode_tokens_per_s"),
                 r.get("ms_per_token"), r.get("prefill_ms"), r.get("total_ms"), r.get("graph_step_ms"), ratio,
                 r.get("note", "")]  # fmt: skip
        lines.append("| " + " | ".join(str(_cell(c)) for c in cells) + " |")
    if result.get("ops"):
        lines += ["", "## Ops at decode sizes (ms per call)", ""]
        lines += ["| op | tokens | dtype | eager ms | graph ms | note |", "| --- | ---: | --- | ---: | ---: | --- |"]
        for r in result["ops"]:
            cells = [r["what"], r["tokens"], r["dtype"], r.get("eager_ms"), r.get("graph_ms"), r.get("note", "")]
            lines.append("| " + " | ".join(str(_cell(c)) for c in cells) + " |")
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; quick 16)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 256; quick 8)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 3; quick 1)")
    p.add_argument(
        "--configs",
        default=None,
        help=f"comma list of configs (default: {','.join(CONFIGS)}; also {','.join(MORE_CONFIGS)})",
    )
    p.add_argument("--variants", default=None, help=f"comma list of variants (default all: {','.join(VARIANTS)})")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no new generate row after this many seconds (rows so far kept)",
    )
    p.add_argument("--no-ops", action="store_true", help="skip the op rows")
    p.add_argument("--commit", default=None, help="commit of the code measured (default: git rev-parse HEAD)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompt = args.prompt or (16 if args.quick else 512)
    new_tokens = args.new_tokens or (8 if args.quick else 256)
    repeats = args.repeats or (1 if args.quick else 3)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.quick and args.batches == "1,32":
        batches = [1, 2]
    result = {**run_info(device), "commit": commit_of(args.commit), "quick": args.quick, "prompt": prompt,
              "new_tokens": new_tokens, "repeats": repeats, "rows": [], "ops": [], "notes": []}  # fmt: skip
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"decode_{result['date']}")

    def save():
        write_text_atomic(stem + ".json", json.dumps(result, indent=2) + "\n")
        write_text_atomic(stem + ".md", markdown(result))

    configs = _pick(args.configs, CONFIGS + MORE_CONFIGS, "config", default=CONFIGS)
    variants = _pick(args.variants, VARIANTS, "variant")
    t0 = time.perf_counter()
    models = {}
    for config in configs:  # both built first: a row of each config in turn, not one config's rows then the other's
        try:
            models[config] = build_model(config, device, args.quick)
        except Exception as e:
            traceback.print_exc()
            result["notes"].append(f"{config}: build failed: {type(e).__name__}: {e}")
    plan = [(v, b, c) for v in variants for b in batches for c in models if v in variants_of(c, device)]
    for n, (variant, batch, config) in enumerate(plan):
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            result["notes"].append(f"--budget-s {args.budget_s:g} reached: {len(plan) - n} generate row(s) not run")
            break
        model, cfg = models[config]
        try:
            row = generate_row(model, cfg, config, variant, batch, prompt, new_tokens, repeats, device)
        except Exception as e:
            traceback.print_exc()
            row = {"config": config, "variant": variant, "batch": batch, "note": f"{type(e).__name__}: {e}"}
        result["rows"].append(row)
        save()
        print(json.dumps(row), f"[{time.perf_counter() - t0:.0f}s]", flush=True)
    models.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_ops:
        result["ops"] = op_rows(device, args.quick, repeats)
    save()
    print(f"wrote {stem}.json and .md in {time.perf_counter() - t0:.0f}s", flush=True)
    return result


if __name__ == "__main__":
    main()
