"""Bytes each rank sends per optimizer step: column sharding (ours) vs rows by expert.

Notation: T tokens per step (global batch x seq_len), d = d_model, hk = heads x top_k, W ranks,
a = bytes of an activation (2 under bf16 autocast, 4 in fp32). Collectives are counted as
NCCL's ring algorithms send them: all-gather / all-to-all (W-1)/W of the tensor, all-reduce
2 (W-1)/W. Per PEER layer and step, forward + backward:

columns (torchpeer.parallel.sharded_layers)::

    all-gather x                     (W-1)/W * T * d * a
    all-reduce u.x partial dots      2 (W-1)/W * T * hk * 4      (fp32)
    all-to-all y, dy, dx             3 (W-1)/W * T * (d / W) * a
    all-reduce dy.v partial dots     2 (W-1)/W * T * hk * 4

rows by expert (rank r owns experts [rN/W, (r+1)N/W), all columns; routing on the token's rank)::

    naive: one activation per selection: x to the expert, y back, dy to the expert, dx back
                                     4 (W-1)/W * (T/W) * hk * d * a  ... per rank
    deduplicated per destination rank (each token's x sent once to every rank that owns one of
    its hk experts, which for hk = 128 >> W is every rank; partial outputs summed before sending):
                                     4 (W-1)/W * T * d * a  +  (W-1)/W * T * hk * 12 / W
                                     (x, y, dy, dx; int32 index + gate + gate gradient)

PKM (values sharded by columns): all-gather x, all-to-all y and dy of width value_dim / W,
all-reduce of the (T, hk) weight gradients. PKM by rows: a value owner needs only each
selection's (index, weight): y and dy travel (naive per selection, or summed per token and
destination), plus 12 bytes per remote selection. The dense parameters' gradients: DDP all-reduce,
2 (W-1)/W * 4 bytes per parameter (fp32 gradients). The replicated router's gradients are in DDP
too (counted there).
"""

from __future__ import annotations

import argparse
import copy

import torch


def _peer_columns(T, d, hk, W, a) -> dict:
    f = (W - 1) / W
    return {
        "all_gather_x": f * T * d * a,
        "all_reduce_dots": 2 * 2 * f * T * hk * 4,
        "all_to_all_y_dy_dx": 3 * f * T * (d / W) * a,
    }


def _peer_rows(T, d, hk, W, a) -> tuple[float, float]:
    f = (W - 1) / W
    naive = 4 * f * (T / W) * hk * d * a  # x, dy out for my tokens' remote selections; y, dx back for others'
    dedup = 4 * f * T * d * a + f * T * hk * 12 / W
    return naive, dedup


def _pkm_rows(T, v, hk, W, a) -> tuple[float, float]:
    # a value owner needs only (index, weight) of each selection, not x: y and dy travel, and the
    # weight gradients come back
    f = (W - 1) / W
    naive = 2 * f * (T / W) * hk * v * a + f * (T / W) * hk * 12
    dedup = 2 * f * T * v * a + f * T * hk * 12 / W
    return naive, dedup


def _pkm_columns(T, d, v, hk, W, a) -> dict:
    f = (W - 1) / W
    return {
        "all_gather_x": f * T * d * a,
        "all_to_all_y_dy": 2 * f * T * (v / W) * a,
        "all_reduce_dw": 2 * f * T * hk * 4,
    }


def communication_per_step(model_cfg, tokens_per_step: int, world: int, act_bytes: int = 2) -> dict:
    """Bytes sent per rank per optimizer step (forward + backward) for ``model_cfg`` (a ModelConfig
    with vocab_size set) at ``tokens_per_step`` global tokens on ``world`` ranks."""
    from torchpeer.lm.model import TransformerLM

    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    with torch.device("meta"):
        model = TransformerLM(copy.deepcopy(model_cfg))
    T, W, a = tokens_per_step, world, act_bytes
    layers, sharded = [], 0
    for name, mod in model.named_modules():
        kind = type(mod).__name__
        if kind not in ("PEER", "PKM"):
            continue
        hk = mod.heads * mod.top_k
        if kind == "PEER":
            cols = _peer_columns(T, mod.d_model, hk, W, a)
            naive, dedup = _peer_rows(T, mod.d_model, hk, W, a)
            sharded += mod.down.numel() + mod.up.numel()
        else:
            cols = _pkm_columns(T, mod.d_model, mod.value_dim, hk, W, a)
            naive, dedup = _peer_rows(T, mod.value_dim, hk, W, a)
            naive, dedup = naive / 2, dedup / 2  # values only: no u.x dots, no dx through the table
            sharded += mod.values.numel()
        layers.append(
            {
                "name": name,
                "kind": kind,
                "columns": cols,
                "columns_total": sum(cols.values()),
                "rows_naive_total": naive,
                "rows_dedup_total": dedup,
            }
        )
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    dense = total - sharded
    ddp = 2 * (W - 1) / W * dense * 4
    return {
        "world_size": W,
        "tokens_per_step": T,
        "act_bytes": a,
        "dense_params": dense,
        "sharded_params": sharded,
        "sharded_params_per_rank": sharded // W,
        "ddp_all_reduce": ddp,
        "layers": layers,
        "total_columns": ddp + sum(lay["columns_total"] for lay in layers),
        "total_rows_dedup": ddp + sum(lay["rows_dedup_total"] for lay in layers),
        "total_rows_naive": ddp + sum(lay["rows_naive_total"] for lay in layers),
    }


# ---------------------------------------------------------------------------- time model

# Measured on one H200 (benchmarks/results/peer_layer_2026-12-01_ema_default.json: 65,536 tokens,
# N = 1024^2, h 8, k 16, d_key 128, bf16): the layer's fwd+bwd minus its mixing kernels' leaves the
# router (query projection, EMA norm, retrieval, gates): 14.2 ms at d 512, 14.4 ms at d 1024, i.e.
# 0.218 us per token whatever d; the mixing kernels move their bytes at 3.55 TB/s (fwd + bwd).
ROUTER_US_PER_TOKEN = 0.218
HBM_TBS = 3.55
# Per selection, mixing fwd + bwd: ids, gates, dots, coefficients and the expert sort (~200 bytes);
# the column split divides the rows' bytes by W but not these (every rank walks every selection).
SCALAR_BYTES = 200
# Assumed (not measured here) per-GPU collective bandwidth: NVLink inside a node, one 400 Gb/s NIC
# per GPU across nodes.
LINK_GBS = {"nvlink": 350.0, "network": 45.0}

SPLITS = ("columns", "columns_split_retrieval", "rows_by_expert")


def peer_time_model(T: int, d: int, hk: int, W: int, table_bytes: int = 4, act_bytes: int = 2, link_gbs=None) -> dict:
    """Per-rank time (ms) and bytes sent (MB) of one PEER layer's forward+backward at T global tokens
    on W ranks, for three splits (perfect balance, no overlap of communication and compute):

    columns                  (sharded_layers.py): every rank routes all T tokens (the replicated
                             router), mixes its d/W columns of every selection; all-gather x, two
                             all-reduces of (T, hk) fp32 dots, all-to-all of y, dy, dx.
    columns_split_retrieval  the next step: each rank routes its own T/W tokens (query-norm
                             statistics by an all-reduce of 2 h d_key floats, negligible), then
                             all-gathers (index, gate) of every selection (int32 + fp32); x travels
                             as an all-to-all of columns, and dgate needs none (it is replicated).
    rows_by_expert           rank r owns N/W experts, all d columns; a token's x goes once to each
                             rank owning one of its hk experts (uniform routing: a fraction
                             1 - (1 - 1/W)^hk of the others), partial y, dy and dx likewise, plus
                             12 bytes per remote selection (index, gate, gate gradient).

    table_bytes: 4 for fp32 tables (AdamW training under autocast), 2 for bf16 working copies.
    link_gbs: collective bandwidth per GPU, default LINK_GBS nvlink for W <= 8, network above.
    """
    f = (W - 1) / W
    link = link_gbs or LINK_GBS["nvlink" if W <= 8 else "network"]
    a = act_bytes
    rows = T * hk * d * (2 * table_bytes + 2 * a + table_bytes)  # fwd: u, v rows; bwd: x, dy rows + a u row
    scalars = T * hk * SCALAR_BYTES
    router = T * ROUTER_US_PER_TOKEN * 1e-3
    reached = 1 - (1 - 1 / W) ** hk  # rows: fraction of the other ranks a token's selections reach
    sent = {
        "columns": f * T * d * a + 2 * 2 * f * T * hk * 4 + 3 * f * T * (d / W) * a,
        "columns_split_retrieval": 4 * f * T * (d / W) * a + 2 * 2 * f * T * hk * 4 + f * T * hk * 8,
        "rows_by_expert": 4 * f * reached * T * d * a + f * T * hk * 12 / W,
    }
    compute = {
        "columns": (router, (rows / W + scalars) / (HBM_TBS * 1e9)),
        "columns_split_retrieval": (router / W, (rows / W + scalars) / (HBM_TBS * 1e9)),
        "rows_by_expert": (router / W, (rows + scalars) / W / (HBM_TBS * 1e9)),
    }
    out = {"W": W, "T": T, "d": d, "hk": hk, "link_gbs": link}
    for split in SPLITS:
        r_ms, m_ms = compute[split]
        c_ms = sent[split] / (link * 1e9) * 1e3
        out[split] = {"router_ms": r_ms, "mix_ms": m_ms, "comm_ms": c_ms, "sent_mb": sent[split] / 1e6,
                      "total_ms": r_ms + m_ms + c_ms}  # fmt: skip
    return out


def format_time_table(models: list[dict]) -> str:
    """Markdown: per split, router + mixing + communication = total ms per rank, and MB sent."""
    out = [
        "| d | W | link GB/s | columns: router + mix + comm = ms (MB) | split retrieval | rows by expert |",
        "|---|---|---|---|---|---|",
    ]
    for m in models:
        cells = []
        for split in SPLITS:
            c = m[split]
            cells.append(
                f"{c['router_ms']:.2f} + {c['mix_ms']:.2f} + {c['comm_ms']:.2f} = **{c['total_ms']:.2f}** "
                f"({c['sent_mb']:,.0f})"
            )
        out.append(f"| {m['d']} | {m['W']} | {m['link_gbs']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f}"


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table of (config name, communication_per_step report) rows."""
    out = [
        "| config | W | tokens/step | DDP all-reduce MB | expert layers: columns MB | rows (dedup) MB "
        "| rows (naive) MB | total (columns) MB | expert params per rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        cols = sum(lay["columns_total"] for lay in r["layers"])
        dedup = sum(lay["rows_dedup_total"] for lay in r["layers"])
        naive = sum(lay["rows_naive_total"] for lay in r["layers"])
        out.append(
            f"| {name} | {r['world_size']} | {r['tokens_per_step']:,} | {_mb(r['ddp_all_reduce'])} | {_mb(cols)} | "
            f"{_mb(dedup)} | {_mb(naive)} | {_mb(r['total_columns'])} | {r['sharded_params_per_rank']:,} |"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    """python -m torchpeer.parallel.comm gpu-peer-small gpu-peer-base --world 2 4 8
    python -m torchpeer.parallel.comm --time-model --world 1 2 8 64 --tokens 32768 --d-model 512 1024"""
    from torchpeer.lm.config_io import load_config

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("configs", nargs="*")
    ap.add_argument("--world", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--vocab-size", type=int, default=16384, help="for configs that take it from the tokenizer")
    ap.add_argument("--act-bytes", type=int, default=2, help="2 under bf16 autocast, 4 in fp32")
    ap.add_argument("--time-model", action="store_true", help="per-rank ms of one PEER layer (peer_time_model)")
    ap.add_argument("--tokens", type=int, default=32768, help="--time-model: global tokens per step")
    ap.add_argument("--d-model", type=int, nargs="+", default=[512, 1024], help="--time-model")
    ap.add_argument("--hk", type=int, default=128, help="--time-model: heads x top_k")
    ap.add_argument("--table-bytes", type=int, default=4, help="--time-model: 4 fp32 tables, 2 bf16")
    args = ap.parse_args(argv)
    if args.time_model:
        models = [
            peer_time_model(args.tokens, d, args.hk, w, args.table_bytes, args.act_bytes)
            for d in args.d_model
            for w in args.world
        ]
        print(format_time_table(models))
        return
    rows = []
    for name in args.configs:
        cfg = load_config(name)
        cfg.model.vocab_size = cfg.model.vocab_size or args.vocab_size
        T = cfg.train.batch_size * cfg.train.grad_accum * cfg.model.seq_len
        for w in args.world:
            rows.append((name, communication_per_step(cfg.model, T, w, args.act_bytes)))
    print(format_table(rows))


if __name__ == "__main__":
    main()
