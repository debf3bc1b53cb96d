"""Merge the routing_<tag>.json files of benchmarks/routing_runs.py into one results file.

    python benchmarks/routing_collect.py OUT_STEM routing_screen1.json routing_screen2.json ...

Writes OUT_STEM.json ({"date", "device", "batches": [...], "rows": [...]}, one row per run and
eval set with ffw, n_experts, query_norm, variant, tokens, eval_set, ppl, usage_pct, kl and the
other routing diagnostics) and OUT_STEM.md (main table on the corpus valid set + ppl per source).
Rows measured before this work (issue 14's table) can be added with --prior PRIOR.json (a list
of rows with a "source" field).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from routing_runs import markdown  # noqa: E402

KEEP = (
    "ffw",
    "n_experts",
    "query_norm",
    "variant",
    "run",
    "seed",
    "tokens",
    "eval_set",
    "eval_tokens",
    "ppl",
    "loss",
    "bpb",
    "usage_pct",
    "kl",
    "tok_per_s",
    "up_init_std",
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_stem")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--prior", help="JSON list of earlier rows (with a 'source' field) to include")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="KEY=FILE",
        help="JSON list of rows of another protocol (CPU proxies, partial runs) stored under KEY",
    )
    args = ap.parse_args(argv)
    rows, batches, device = [], [], None
    for path in args.inputs:
        with open(path) as fh:
            r = json.load(fh)
        device = device or f"{r['device']} (torch {r.get('torch')}, triton {r.get('triton')})"
        batches.append(
            {
                "tag": r["tag"],
                "date": r["date"],
                "wall_seconds": round(r["wall_seconds"], 1),
                "parallel": r["parallel"],
                "common_overrides": r["common"],
                "failed": r["failed"],
                # the periodic evals (first 4 batches of each set): the corpus set only, to keep the file small
                "trace": {
                    run["run"]["name"]: [{"step": t["step"], "corpus": t.get("corpus")} for t in run["trace"]]
                    for run in r["runs"]
                },
            }
        )
        overrides = {run["run"]["name"]: run["run"].get("overrides", []) for run in r["runs"]}
        for row in r["rows"]:
            out = {k: row.get(k) for k in KEEP}
            ov = overrides.get(row["run"], [])
            scale = float(ov[ov.index("--model.peer.up_init_scale") + 1]) if "--model.peer.up_init_scale" in ov else 1.0
            # the harness's up_init_scale multiplies the old init std 1/sqrt(heads * G) (sqrt(2) at h 8, k 16)
            out["up_init_std"] = round(scale * math.sqrt(2.0), 4) if row["ffw"] == "peer" else None
            out["batch"] = r["tag"]
            out["routing"] = {k[2:]: v for k, v in row.items() if k.startswith("r_")}
            rows.append(out)
    prior = []
    if args.prior:
        with open(args.prior) as fh:
            prior = json.load(fh)
    result = {"date": batches[-1]["date"], "device": device, "batches": batches, "prior_rows": prior, "rows": rows}
    extras = {}
    for item in args.extra:
        key, path = item.split("=", 1)
        with open(path) as fh:
            extras[key] = json.load(fh)
    result.update(extras)
    with open(args.out_stem + ".json", "w") as fh:
        json.dump(result, fh, indent=1)
    flat = [{**row, **{f"r_{k}": v for k, v in row["routing"].items()}} for row in rows]
    tag = "+".join(b["tag"] for b in batches)
    common = batches[0]["common_overrides"]
    md = markdown({"tag": tag, "date": result["date"], "device": device, "common": common, "rows": flat})
    if prior:
        md += "\nMeasured before this work (issue 14, same protocol):\n\n"
        md += "| model | query norm | N | variant | ppl | usage % | KL |\n"
        md += "| --- | --- | ---: | --- | ---: | ---: | ---: |\n"
        for p in prior:
            u = "-" if p.get("usage_pct") is None else f"{p['usage_pct']:.2f}"
            kl = "-" if p.get("kl") is None else f"{p['kl']:.2f}"
            n = p["n_experts"] or "-"
            md += f"| {p['ffw']} | {p['query_norm']} | {n} | {p['variant']} | {p['ppl']:.2f} | {u} | {kl} |\n"
    for key, extra in extras.items():
        md += f"\n`{key}`:\n\n| ffw | N | query norm | variant | tokens | eval set | ppl | usage % | KL |\n"
        md += "| --- | ---: | --- | --- | ---: | --- | ---: | ---: | ---: |\n"
        for p in extra:
            u = "-" if p.get("usage_pct") is None else f"{p['usage_pct']:.2f}"
            kl = "-" if p.get("kl") is None else f"{p['kl']:.2f}"
            md += (
                f"| {p['ffw']} | {p['n_experts']} | {p['query_norm']} | {p['variant']} | {p['tokens']:,} | "
                f"{p['eval_set']} | {p['ppl']:.2f} | {u} | {kl} |\n"
            )
    with open(args.out_stem + ".md", "w") as fh:
        fh.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
