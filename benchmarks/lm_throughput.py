"""LM training throughput (issue 9) and the PEER layer rows it depends on, in one run.

Part 1, layer rows (d_model 1024, N = 1024^2, heads 8, top_k 16, 65536 tokens, bf16 activations):
  the PEER layer fwd and fwd+bwd with bf16 tables, with fp32 master tables under autocast, with
  the fused row-wise Adam (fp32 tables; bf16 working tables + fp32 masters) and the fused
  element-wise Adam (bf16 working tables + fp32 masters), and the mixing op alone (also with each
  fused update) under uniform and skewed routing (90% of the selections on 64 experts), the latter
  also with the segmented backward switched off (one program per expert, the previous kernel).
Part 2, LM rows: gpu-dense-small, gpu-peer-small, gpu-dense-base, gpu-peer-base at their configs'
  batch (64 x 512), bf16 autocast, eager and (while the time budget lasts) torch.compile'd, each
  PEER config with train.expert_optimizer adamw / rowwise_adam / rowwise_adam + bf16 tables
  ("rowwise_adam_bf16"; "_m16": also bf16 first moments); --configs NAME:OPTIMIZER also takes
  elementwise_adam and elementwise_adam_bf16 (per-element second moments).
  Every step is split by CUDA events into fwd (loss), bwd (backward + clip_grad_norm_; with
  rowwise_adam it includes the table update) and opt (AdamW step + zero_grad); medians over the
  measured steps; tokens_per_s = batch tokens / median step time; peak_gib =
  torch.cuda.max_memory_allocated over the measured steps (parameters included).
  Data: SYNTHETIC uniform random tokens (vocab 16384, the configs' BPE size): step time does not
  depend on token content except through routing, which is near uniform at initialisation.

    python benchmarks/lm_throughput.py --budget-s 200          # on the GPU
    python benchmarks/lm_throughput.py --no-layer --compiled-only --budget-s 480   # issue 19's compiled pairs
    python benchmarks/lm_throughput.py --no-layer --configs gpu-dense-small,gpu-peer-small,gpu-peer-multi-tuned-small
                                       # issue 18: the winner's tokens/s beside its dense twin's, one run
    TRITON_INTERPRET=1 python benchmarks/lm_throughput.py --quick   # CPU smoke test

Writes <out-dir>/lm_throughput_<date>.json (and .md): {"rows": [...LM rows...], "layer_rows": [...]}.
Rows past the time budget are listed with note "skipped: time budget".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

from benchmarks.peer_layer import copy_tbs, run_info, time_ms  # noqa: E402
from torchpeer.data.atomic import write_text_atomic  # noqa: E402
from torchpeer.lm.config import EXPERT_OPTIMIZERS, FUSED_EXPERT_OPTIMIZERS  # noqa: E402

VOCAB = 16384


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device):
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


# ---------------------------------------------------------------------------- layer rows


def skewed_indices(T, H, K, N, frac, n_hot, device, seed=0):
    """(T, H, K) int64: uniform experts, except `frac` of the selections on experts 0..n_hot-1."""
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.randint(0, N, (T, H, K), device=device, generator=gen)
    if frac:
        hot = torch.rand((T, H, K), device=device, generator=gen) < frac
        idx = torch.where(hot, torch.randint(0, n_hot, (T, H, K), device=device, generator=gen), idx)
    return idx


def mixing_rows(d, T, cfg, device, budget_s, segments=(None,), skews=(0.0, 0.9), fused=False):
    """The mixing op alone (bf16 x, bf16 tables): fwd+bwd ms per (skew, segment)."""
    from torchpeer.ops.expert_mixing import triton_op
    from torchpeer.ops.expert_mixing.triton_fused_op import expert_mix_rowwise_adam
    from torchpeer.optim import RowwiseAdamState

    H, K, N = cfg["heads"], cfg["top_k"], cfg["n_experts"]
    rows = []
    x = torch.randn(T, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    gates = torch.rand(T, H, K, device=device, requires_grad=True)
    down = (torch.randn(N, d, device=device) / d**0.5).to(torch.bfloat16)
    up = (torch.randn(N, d, device=device) / d**0.5).to(torch.bfloat16)
    saved = dict(triton_op.TUNING["expert"])
    for skew in skews:
        idx = skewed_indices(T, H, K, N, skew, 64, device)
        for seg in segments:
            name = "segmented" if seg is None else ("unsplit" if seg >= 1 << 30 else f"segment {seg}")
            row = {"what": f"mixing fwd+bwd ({name})", "d_model": d, "tokens": T, "skew_90_on_64": bool(skew)}
            triton_op.TUNING["expert"] = dict(saved, **({} if seg is None else {"segment": seg}))
            dn, u = down.clone().requires_grad_(), up.clone().requires_grad_()

            def step(dn=dn, u=u, idx=idx):
                x.grad = gates.grad = dn.grad = u.grad = None
                triton_op.expert_mix_triton(x, dn, u, idx, gates).backward(dy)

            row["ms"] = round(time_ms(step, device, budget_s=budget_s), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del dn, u
        for kind in ("rowwise_adam", "elementwise_adam") if fused else ():
            st = [RowwiseAdamState.zeros_like(t, elementwise=kind == "elementwise_adam") for t in (down, up)]
            hyper = torch.tensor([1e-5, 0.9, 0.999, 1e-8, 0.0], device=device)
            what = f"mixing fwd+bwd+{kind} (fused)"
            row = {"what": what, "d_model": d, "tokens": T, "skew_90_on_64": bool(skew)}

            def fstep(st=st, hyper=hyper, idx=idx):
                x.grad = gates.grad = None
                expert_mix_rowwise_adam(x, down, up, idx, gates, "gelu", st[0], st[1], hyper).backward(dy)

            row["ms"] = round(time_ms(fstep, device, budget_s=budget_s), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del st
    triton_op.TUNING["expert"] = saved
    return rows


def layer_rows(d, T, cfg, device, budget_s):
    """The whole PEER layer (triton): bf16 tables; fp32 tables under autocast; fused optimizers."""
    from torchpeer import PEER
    from torchpeer.optim import RowwiseTableAdam

    rows = []
    for variant in ("bf16 tables", "fp32 tables + autocast", "fp32 tables + autocast + rowwise_adam",
                    "bf16 tables + fp32 master + autocast + rowwise_adam",
                    "bf16 tables + fp32 master + bf16 moments + autocast + rowwise_adam",
                    "bf16 tables + fp32 master + autocast + elementwise_adam"):  # fmt: skip
        torch.manual_seed(0)
        with device:
            layer = PEER(d, cfg["n_experts"], cfg["heads"], cfg["top_k"], cfg["d_key"], backend="triton")
        if variant == "bf16 tables":
            layer.to(torch.bfloat16)
        engine = None
        if variant.endswith("_adam"):
            engine = RowwiseTableAdam(
                {"l": layer}, lr=1e-5, bf16_tables="bf16" in variant, bf16_moments="bf16 moments" in variant,
                elementwise=variant.endswith("elementwise_adam"),
            )  # fmt: skip
        params = sum(p.numel() * p.element_size() for p in layer.parameters())
        x = torch.randn(T, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        auto = "autocast" in variant
        row = {"what": f"PEER layer, {variant}", "d_model": d, "tokens": T}

        def fwd(layer=layer, x=x, auto=auto):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=auto):
                return layer(x)

        def fwd_bwd(layer=layer, x=x, dy=dy, fwd=fwd):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            fwd().backward(dy)

        try:
            row["fwd_ms"] = round(time_ms(fwd, device, budget_s=budget_s), 3)
            row["fwd_bwd_ms"] = round(time_ms(fwd_bwd, device, budget_s=budget_s), 3)
            layer.zero_grad(set_to_none=True)
            _sync(device)
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                _peak_reset(device)
                fwd_bwd()
                _sync(device)
                row["peak_above_params_gib"] = round((torch.cuda.max_memory_allocated(device) - params) / 2**30, 3)
                row["peak_above_resident_gib"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**30, 3)
        except Exception as e:  # keep the other rows
            traceback.print_exc()
            row["note"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if engine is not None:
            engine.detach()
        del layer, engine, x, dy, fwd, fwd_bwd
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------- LM rows


def lm_overrides(config: str, quick: bool) -> list[tuple[str, str]]:
    """The config overrides of an LM row (also decode.py's): the BPE-16k vocabulary, and with quick a
    tiny model (2 blocks, d 32; PEER in the middle block whatever the config's placement, 256 experts)."""
    overrides = [("model.vocab_size", str(VOCAB))]
    if quick:
        overrides += [("model.d_model", "32"), ("model.n_layers", "2"), ("model.n_heads", "2"),
                      ("model.seq_len", "16"), ("model.placement", "middle")]  # fmt: skip
        if "peer" in config:
            overrides += [("model.peer.n_experts", "256"), ("model.peer.heads", "2"), ("model.peer.top_k", "4"),
                          ("model.peer.d_key", "16")]  # fmt: skip
    return overrides


def lm_row(config, expert_optimizer, compiled, device, steps, warmup, quick):
    from torchpeer.lm.config_io import load_config
    from torchpeer.lm.model import TransformerLM
    from torchpeer.lm.optim import build_optimizer

    overrides = lm_overrides(config, quick)
    if quick:
        overrides.append(("train.batch_size", "2"))
    cfg = load_config(config, overrides)
    t = cfg.train
    B, L = t.batch_size, cfg.model.seq_len
    row = {"config": config, "compiled": compiled, "expert_optimizer": expert_optimizer, "batch": B, "seq_len": L}
    torch.manual_seed(0)
    with device:
        model = TransformerLM(cfg.model)
    table_opt = None
    if expert_optimizer != "adamw":
        from torchpeer.optim import attach_rowwise_adam

        m16 = expert_optimizer.endswith("_m16")  # this benchmark's variant: also bf16 first moments
        options = dict(FUSED_EXPERT_OPTIMIZERS[expert_optimizer.removesuffix("_m16")], bf16_moments=m16)
        table_opt = attach_rowwise_adam(model, t.table_lr, (t.beta1, t.beta2), t.eps, t.expert_weight_decay, **options)
    opt = build_optimizer(model, t, device.type)
    params = [p for p in model.parameters() if p.requires_grad]
    if compiled:  # a fresh cache per row: rows of one process would otherwise share (and exhaust) the
        torch._dynamo.reset()  # recompile limit of the shared code, e.g. a guard on each config's pool key
    fwd_model = torch.compile(model) if compiled else model
    batches = [torch.randint(0, VOCAB, (B, L + 1), device=device) for _ in range(4)]
    auto = device.type == "cuda"
    times = {"fwd": [], "bwd": [], "opt": [], "step": []}
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            _peak_reset(device)
        seq = batches[i % len(batches)]
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if auto else None
        t0 = time.perf_counter()
        if ev:
            ev[0].record()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=auto):
            _, loss = fwd_model(seq[:, :-1], seq[:, 1:])
            aux = model.aux_loss()  # the FFWs' weighted terms (the balance term), as the trainer adds them
            if aux is not None:
                loss = loss + aux
        if ev:
            ev[1].record()
        loss.backward()
        if table_opt is not None:  # a shared pool's table update (after its layers' backwards), as the trainer
            table_opt.step()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        if ev:
            ev[2].record()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ev:
            ev[3].record()
        if i >= warmup:
            if ev:
                ev[3].synchronize()
                for k, (a, b) in zip(("fwd", "bwd", "opt", "step"), ((0, 1), (1, 2), (2, 3), (0, 3))):
                    times[k].append(ev[a].elapsed_time(ev[b]))
            else:
                times["step"].append((time.perf_counter() - t0) * 1e3)
    for k, v in times.items():
        row[f"{k}_ms"] = round(statistics.median(v), 3) if v else None
    row["tokens_per_s"] = round(B * L / (row["step_ms"] / 1e3), 1)
    # the mean over the measured steps (the trainer reports a mean rate), beside the median-based one
    row["tokens_per_s_mean"] = round(B * L / (statistics.fmean(times["step"]) / 1e3), 1)
    row["peak_gib"] = _peak_gib(device)
    row["loss_last"] = round(float(loss.detach()), 4)
    if table_opt is not None:
        table_opt.detach()  # breaks the layer -> mixer -> optimizer -> layer cycle, so the tables free now
    del model, fwd_model, opt, table_opt, params, batches, loss
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(result):
    lines = [f"# LM throughput, {result['date']}", "",
             f"Device: {result['gpu']}; torch {result['torch']}; triton {result['triton']}; copy ceiling "
             f"{result['copy_tbs']} TB/s. Synthetic tokens (vocab {VOCAB}), bf16 autocast.", "",
             "| config | compiled | expert optimizer | tokens/s | tokens/s (mean) | fwd ms | bwd ms | opt ms | step ms"
             " | peak GiB | note |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in result["rows"]:
        lines.append(
            f"| {r['config']} | {r['compiled']} | {r['expert_optimizer']} | {r.get('tokens_per_s')}"
            f" | {r.get('tokens_per_s_mean', '')} | {r.get('fwd_ms')}"
            f" | {r.get('bwd_ms')} | {r.get('opt_ms')} | {r.get('step_ms')} | {r.get('peak_gib')}"
            f" | {r.get('note', '')} |"
        )
    lines += ["", "| layer / op | d | tokens | skew | fwd ms | fwd+bwd ms | peak above params GiB | note |",
              "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in result["layer_rows"]:
        lines.append(
            f"| {r['what']} | {r['d_model']} | {r['tokens']} | {r.get('skew_90_on_64', '')} | {r.get('fwd_ms', '')}"
            f" | {r.get('fwd_bwd_ms', r.get('ms'))} | {r.get('peak_above_params_gib', '')} | {r.get('note', '')} |"
        )
    return "\n".join(lines) + "\n"


# LM rows, most informative first (the budget may cut the tail): the small pair eager, the small pair
# compiled (issue 19's target), the base pair compiled, the base pair eager, then the other variants.
# (config, expert optimizer, compiled)
LM_PLAN = [
    ("gpu-dense-small", "adamw", False), ("gpu-peer-small", "adamw", False),
    ("gpu-peer-small", "rowwise_adam", False), ("gpu-peer-small", "rowwise_adam_bf16", False),
    ("gpu-dense-small", "adamw", True), ("gpu-peer-small", "rowwise_adam_bf16", True),
    ("gpu-dense-base", "adamw", True), ("gpu-peer-base", "rowwise_adam_bf16", True),
    ("gpu-dense-base", "adamw", False), ("gpu-peer-base", "adamw", False),
    ("gpu-peer-base", "rowwise_adam_bf16", False), ("gpu-peer-small", "rowwise_adam_bf16_m16", False),
    ("gpu-peer-small", "adamw", True),
    ("gpu-peer-base", "rowwise_adam", False),
]  # fmt: skip


# the tables' optimizers an LM row can use: train.expert_optimizer's choices, and the bf16-moments variant
# of attach_rowwise_adam that only this benchmark times
TABLE_OPTIMIZERS = (*EXPERT_OPTIMIZERS, "rowwise_adam_bf16_m16")


def lm_plan(compiled_only: bool = False, quick: bool = False, configs: str | None = None) -> list[tuple]:
    """The LM rows to run, in order: LM_PLAN; compiled_only keeps issue 19's compiled pairs (each dense
    row right before its PEER twin, so a cut run still has a ratio); quick (CPU) drops compiled rows;
    configs ("a,b,c") replaces the plan with those configs in that order: eager, or compiled with
    compiled_only; each on AdamW, or on the tables' optimizer named after a colon
    ("gpu-peer-multi-tuned-small:rowwise_adam_bf16"), so one run can put both beside the dense twin."""
    if configs:
        items = [c.strip() for c in configs.split(",") if c.strip()]
        if not items:
            raise ValueError(f"--configs {configs!r} names no config; give e.g. gpu-dense-small,gpu-peer-small")
        plan = []
        for item in items:
            name, _, optimizer = item.partition(":")
            optimizer = optimizer.strip() or "adamw"
            if optimizer not in TABLE_OPTIMIZERS:
                raise ValueError(
                    f"--configs item {item!r}: unknown tables' optimizer {optimizer!r}; write NAME or "
                    f"NAME:OPTIMIZER with OPTIMIZER one of {', '.join(TABLE_OPTIMIZERS)}"
                )
            plan.append((name.strip(), optimizer, compiled_only))
        return plan
    if compiled_only:
        return [r for r in LM_PLAN if r[2] and (r[0].startswith("gpu-dense") or r[1] == "rowwise_adam_bf16")]
    return [r for r in LM_PLAN if not r[2]] if quick else list(LM_PLAN)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test, TRITON_INTERPRET=1)")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip the remaining rows after this many seconds")
    p.add_argument("--no-layer", action="store_true")
    p.add_argument("--no-lm", action="store_true")
    p.add_argument(
        "--compiled-only",
        action="store_true",
        help="LM rows: only issue 19's compiled pairs (small and base, dense beside PEER with the tables' "
        "rowwise_adam_bf16), about 80 s each",
    )
    p.add_argument(
        "--configs",
        help="LM rows: these configs (comma-separated names or .toml paths) instead of the plan, eager (with "
        "--compiled-only: compiled), in the order given, 16 measured steps each, the tables on AdamW or on the "
        f"optimizer after a colon ({', '.join(TABLE_OPTIMIZERS)}); e.g. issue 18's "
        "winner both ways beside its dense twin: --configs "
        "gpu-dense-small,gpu-peer-multi-tuned-small,gpu-peer-multi-tuned-small:rowwise_adam_bf16",
    )
    args = p.parse_args(argv)
    try:
        plan = lm_plan(args.compiled_only, args.quick, args.configs)
    except ValueError as e:
        p.error(str(e))
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        **run_info(device),
        "copy_tbs": None,
        "data": f"synthetic uniform tokens, vocab {VOCAB}",
        "rows": [],
        "layer_rows": [],
        "notes": [],
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"lm_throughput_{result['date']}")

    def save():
        write_text_atomic(stem + ".json", json.dumps(result, indent=2) + "\n")
        write_text_atomic(stem + ".md", markdown(result))

    def left():
        return args.budget_s - (time.perf_counter() - t_start)

    if device.type == "cuda":
        result["copy_tbs"] = round(copy_tbs(device), 4)
    if args.quick:
        cfg = dict(n_experts=16**2, heads=2, top_k=4, d_key=16)
        d, T, skew_d, skew_T, budget = 32, 64, 32, 64, 0.05
    else:
        cfg = dict(n_experts=1024**2, heads=8, top_k=16, d_key=128)
        d, T, skew_d, skew_T, budget = 1024, 65536, 512, 8192, 0.5
    if not args.no_layer:
        for name, fn in (
            ("layer", lambda: layer_rows(d, T, cfg, device, budget)),
            ("mixing", lambda: mixing_rows(d, T, cfg, device, budget, fused=True)),
            ("mixing small", lambda: mixing_rows(skew_d, skew_T, cfg, device, budget, segments=(None, 1 << 30))),
        ):
            if left() < 0:
                result["notes"].append(f"{name} rows skipped: time budget")
                continue
            try:
                result["layer_rows"] += fn()
            except Exception as e:
                traceback.print_exc()
                result["notes"].append(f"{name} rows failed: {type(e).__name__}: {e}"[:300])
            save()
    steps, warmup = (2, 1) if args.quick else (16, 3) if args.configs else (8, 3)
    for config, opt_name, compiled in [] if args.no_lm else plan:
        row = {"config": config, "compiled": compiled, "expert_optimizer": opt_name}
        if left() < (75 if compiled else 10):  # a compiled row spends about a minute compiling
            row["note"] = "skipped: time budget"
        else:
            try:
                row = lm_row(config, opt_name, compiled, device, steps, warmup, args.quick)
            except Exception as e:
                traceback.print_exc()
                row["note"] = f"{type(e).__name__}: {e}"[:300]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        result["rows"].append(row)
        print(json.dumps(row), f"[{time.perf_counter() - t_start:.0f}s]", flush=True)
        save()
    save()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
