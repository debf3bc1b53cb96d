"""Routing research runs: train several LM variants (concurrently on one GPU) and collect one row
per (variant, eval set) with perplexity and the routing diagnostics of the PEER/PKM layer.

    python benchmarks/routing_runs.py --spec SPEC.json --out OUT_DIR [--parallel 4] [--tag NAME]

SPEC.json: {"common": [override, ...], "runs": [{"name": ..., "config": "gpu-peer-small",
"overrides": [...], "query_norm": ..., "variant": ...}, ...]}. Every run is
``python -m torchpeer.cli train CONFIG --run-dir RUNS/NAME COMMON... OVERRIDES...`` in its own process
(``--parallel`` at a time: small models leave a large GPU idle between kernels, so several runs
share it). The token cache is filled once first (``torchpeer data``) so that the runs do not
tokenise concurrently. Writes OUT/routing_<tag>.json (rows + each run's routing report and eval
trace) and OUT/routing_<tag>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _override_value(overrides: list[str], key: str, default=None):
    for i, a in enumerate(overrides):
        if a == key and i + 1 < len(overrides):
            return overrides[i + 1]
        if a.startswith(key + "="):
            return a.split("=", 1)[1]
    return default


def _data_args(common: list[str]) -> list[str]:
    """`torchpeer data` arguments equivalent to the data overrides of the runs."""
    args = []
    train = _override_value(common, "--data.train")
    if train:
        args += ["--train", train]
    tok = _override_value(common, "--data.tokenizer")
    if tok:
        args += ["--tokenizer", tok]
    for i, a in enumerate(common):
        if a.startswith("--data.valid.") and i + 1 < len(common):
            args += ["--valid", f"{a[len('--data.valid.') :]}={common[i + 1]}"]
    return args


def read_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    trace, rates = [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            if "tok_per_s" in rec and rec.get("step", 0) > 0:
                rates.append(rec["tok_per_s"])
            if "eval" in rec:
                point = {"step": rec["step"]}
                for name, v in rec["eval"].items():
                    point[name] = {"ppl": v["ppl"], **next(iter(v.get("routing", {}).values()), {})}
                trace.append(point)
    with open(os.path.join(run_dir, "config.json")) as fh:
        config = json.load(fh)
    median_rate = sorted(rates)[len(rates) // 2] if rates else None
    return {"summary": summary, "config": config, "trace": trace, "tok_per_s": median_rate}


def rows_of(run: dict, got: dict) -> list[dict]:
    s = got["summary"]
    overrides = run.get("overrides", [])
    cfg = got["config"].get("model", {})
    ffw = cfg.get("ffw", run["config"].split("-")[1])
    n_experts = None
    if ffw == "peer":
        n_experts = cfg.get("peer", {}).get("n_experts")
    elif ffw == "pkm":
        n_keys = cfg.get("pkm", {}).get("n_keys")
        n_experts = n_keys * n_keys if n_keys else None
    out = []
    for name, v in s["valid"].items():
        routing = next(iter(v.get("routing", {}).values()), {})
        row = {
            "ffw": ffw,
            "n_experts": n_experts,
            "query_norm": run.get("query_norm", _override_value(overrides, "--model.peer.query_norm", "-")),
            "variant": run.get("variant", run["name"]),
            "run": run["name"],
            "seed": int(_override_value(overrides, "--train.seed", 0)),
            "tokens": s["tokens"],
            "eval_set": name,
            "eval_tokens": v["tokens"],
            "ppl": v["ppl"],
            "loss": v["loss"],
            "bpb": v["bpb"],
            "usage_pct": routing.get("usage_pct"),
            "kl": routing.get("kl"),
            "tok_per_s": got["tok_per_s"],
            "train_seconds": s.get("train_seconds"),
        }
        row.update({f"r_{k}": val for k, val in routing.items() if k not in ("usage_pct", "kl")})
        out.append(row)
    return out


def markdown(result: dict, main_set: str = "corpus") -> str:
    lines = [
        f"# Routing runs `{result['tag']}`, {result['date']}",
        "",
        f"Device: {result['device']}; overrides common to all runs: `{' '.join(result['common'])}`",
        "",
        "| variant | ffw | N | query norm | tokens | eval set | ppl | usage % | KL | head usage % | head overlap"
        " | q eff rank | sub-key top-10 share | tok/s |",
        "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    for r in result["rows"]:
        if r["eval_set"] != main_set:
            continue
        top10 = None
        if r.get("r_subkey_top10_share_0") is not None:
            top10 = (r["r_subkey_top10_share_0"] + r["r_subkey_top10_share_1"]) / 2
        variant = r["variant"] if r.get("up_init_std") is None else f"{r['variant']} [up std {r['up_init_std']}]"
        lines.append(
            f"| {variant} | {r['ffw']} | {r['n_experts'] or '-'} | {r['query_norm']} | {r['tokens']:,} | "
            f"{r['eval_set']} | {r['ppl']:.2f} | {f(r['usage_pct'], '.1f')} | {f(r['kl'], '.2f')} | "
            f"{f(r.get('r_head_usage_pct'), '.2f')} | {f(r.get('r_head_overlap'), '.3f')} | "
            f"{f(r.get('r_query_eff_rank'), '.1f')} | {f(top10, '.3f')} | {f(r['tok_per_s'], ',.0f')} |"
        )
    sets = sorted({r["eval_set"] for r in result["rows"]} - {main_set})
    if sets:
        lines += ["", "Perplexity per source:", "", "| variant | " + " | ".join(sets) + " |"]
        lines.append("| --- |" + " ---: |" * len(sets))
        by = {}
        for r in result["rows"]:
            by.setdefault(r["run"], {})[r["eval_set"]] = r["ppl"]
        for run, d in by.items():
            lines.append(f"| {run} | " + " | ".join(f(d.get(s), ".2f") for s in sets) + " |")
    failed = result.get("failed", [])
    if failed:
        lines += ["", "Failed runs: " + ", ".join(f"{x['name']} (rc {x['rc']})" for x in failed)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs-dir", default="runs/routing")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--tag", default="runs")
    ap.add_argument("--main-set", default="corpus", help="eval set of the main table (the others: ppl per set)")
    ap.add_argument("--timeout", type=float, default=560.0, help="seconds after which unfinished runs are killed")
    ap.add_argument("--start-by", type=float, default=None, help="skip runs not started this many seconds in")
    ap.add_argument("--corpus", default=".corpus", help="replaces {corpus} in the spec's overrides")
    args = ap.parse_args(argv)
    with open(args.spec) as fh:
        spec = json.load(fh)

    def fill(items):
        return [a.replace("{corpus}", args.corpus) for a in items]

    common = fill(spec.get("common", []))
    for run in spec["runs"]:
        run["overrides"] = fill(run.get("overrides", []))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    data_cmd = [sys.executable, "-m", "torchpeer.cli", "data", "--no-progress", "--config", spec["runs"][0]["config"]]
    data_cmd += _data_args(common)
    rc = subprocess.call(data_cmd, env=env)
    print(f"[routing_runs] tokenised in {time.time() - t0:.1f}s (rc {rc})", flush=True)
    pending, active, done, failed = list(spec["runs"]), [], [], []
    deadline = t0 + args.timeout
    while pending or active:
        while pending and len(active) < args.parallel:
            run = pending.pop(0)
            if args.start_by is not None and time.time() - t0 > args.start_by:
                print(f"[routing_runs] +{time.time() - t0:.0f}s skip {run['name']} (past --start-by)", flush=True)
                failed.append({"name": run["name"], "rc": "not started"})
                continue
            run_dir = os.path.join(args.runs_dir, run["name"])
            cmd = [sys.executable, "-m", "torchpeer.cli", "train", run["config"], "--run-dir", run_dir, "--no-progress"]
            cmd += common + run.get("overrides", [])
            log = open(os.path.join(args.out, f"{run['name']}.log"), "w")
            print(f"[routing_runs] +{time.time() - t0:.0f}s start {run['name']}: {' '.join(cmd[3:])}", flush=True)
            active.append((run, run_dir, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(2)
        for item in list(active):
            run, run_dir, proc, log = item
            if proc.poll() is None and time.time() > deadline:
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                log.close()
                active.remove(item)
                print(f"[routing_runs] +{time.time() - t0:.0f}s end {run['name']} rc {proc.returncode}", flush=True)
                if proc.returncode == 0:
                    done.append((run, read_run(run_dir)))
                else:
                    failed.append({"name": run["name"], "rc": proc.returncode})
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        versions = {"torch": torch.__version__}
        try:
            import triton

            versions["triton"] = triton.__version__
        except ImportError:
            versions["triton"] = None
    except ImportError:  # pragma: no cover
        device, versions = "unknown", {}
    result = {
        "tag": args.tag,
        "date": datetime.date.today().isoformat(),
        "device": device,
        **versions,
        "common": common,
        "parallel": args.parallel,
        "wall_seconds": time.time() - t0,
        "runs": [{"run": r, "routing": g["summary"]["valid"], "trace": g["trace"]} for r, g in done],
        "rows": [row for r, g in done for row in rows_of(r, g)],
        "failed": failed,
    }
    with open(os.path.join(args.out, f"routing_{args.tag}.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    md = markdown(result, args.main_set)
    with open(os.path.join(args.out, f"routing_{args.tag}.md"), "w") as fh:
        fh.write(md)
    print(md)
    return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
