"""Expert usage and KL of an untrained product-key router: how much of a 1024^2 pool random queries
reach on an eval set of a given size (issue 18: "what keeps a quarter of the experts idle?").

Queries as a PEER layer at init presents them: x ~ N(0, I_d_model), a random query projection per
head (d_model -> d_key), each feature standardised over the batch (what the BatchNorm / ema norm
does); sub-keys N(0, 1) as initialised, or each row scaled to one norm (key_norm "l2": only
directions count). Usage % and KL(z || uniform) of the softmax gate mass, the paper's definitions as
the eval reports them (torchpeer.diagnostics.ExpertUsage), over all heads. CPU, the torch backend;
~3 min per (d_model, keys) at 800k tokens.

    python benchmarks/routing_init_usage.py --tokens 800000 --d-models 64,512 --keys random,l2
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from torchpeer.diagnostics import ExpertUsage  # noqa: E402
from torchpeer.ops import product_key_topk  # noqa: E402


def simulate(d_model, keys, tokens, heads=8, top_k=16, d_key=128, n=1024, chunk=20_000, seed=0) -> ExpertUsage:
    """The gate mass per expert of `tokens` random tokens through a random query projection."""
    g = torch.Generator().manual_seed(seed)
    sub_keys = torch.randn(1, 2, n, d_key // 2, generator=g)
    if keys == "l2":
        sub_keys = sub_keys / sub_keys.norm(dim=-1, keepdim=True)
    w = torch.randn(d_model, heads * d_key, generator=g) / d_model**0.5
    usage = ExpertUsage(n * n)
    for t0 in range(0, tokens, chunk):
        x = torch.randn(min(chunk, tokens - t0), d_model, generator=g)
        q = (x @ w).view(-1, heads, d_key)
        q = (q - q.mean(0)) / q.std(0)
        scores, idx = product_key_topk(q, sub_keys, top_k, backend="torch")
        usage.update(idx, scores.softmax(-1))
    return usage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=800_000, help="eval tokens (the corpus valid set has ~805k)")
    ap.add_argument("--d-models", default="64,512", help="comma list of d_model (query rank min(d_model, d_key))")
    ap.add_argument("--keys", default="random,l2", help="comma list: random (N(0,1) rows), l2 (rows of one norm)")
    args = ap.parse_args()
    for keys in args.keys.split(","):
        for d in (int(v) for v in args.d_models.split(",")):
            t0 = time.time()
            u = simulate(d, keys, args.tokens)
            print(f"keys {keys:6s} d_model {d:4d} tokens {args.tokens}: usage {u.usage():.1f} %, KL {u.kl():.2f} "
                  f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
