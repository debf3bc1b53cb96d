"""One-GPU smoke test of the sharded PEER path under torchrun (NCCL, world size 1):

    torchrun --standalone --nproc_per_node 1 benchmarks/multigpu_smoke.py

With one process the trainer keeps the fused kernels (nothing to split), so this runs the
column-sharded layer explicitly: forward + backward under bf16 autocast against the unsharded
layer (same weights), and prints the max errors and the time of both (CUDA events, median).
On a GPU the sharded layer now runs the column-sliced Triton kernels (issue 20); the full
comparison at several sizes, written to JSON and markdown, is benchmarks/sharded_layer.py.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peer_layer import time_ms  # noqa: E402

from torchpeer.layers.peer import PEER  # noqa: E402
from torchpeer.parallel import ShardContext, init_distributed, shard_layer_  # noqa: E402


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--n-experts", type=int, default=256**2)
    ap.add_argument("--d-model", type=int, default=512)
    args = ap.parse_args()
    env = init_distributed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dev = env.device
    torch.manual_seed(0)
    kw = dict(d_model=args.d_model, n_experts=args.n_experts, heads=8, top_k=16, d_key=128)
    ref = PEER(**kw).to(dev)
    sharded = PEER(**kw).to(dev)
    sharded.load_state_dict(ref.state_dict())
    shard_layer_(sharded, ShardContext(dist.group.WORLD, env.rank, env.world_size))
    x = torch.randn(args.tokens, args.d_model, device=dev)

    def step(layer, keep=None):
        xx = x.clone().requires_grad_(True)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            y = layer(xx)
        y.float().square().mean().backward()
        if keep is not None:
            keep.update(y=y.detach().float(), dx=xx.grad, dd=layer.down.grad.clone(), du=layer.up.grad.clone())
        layer.zero_grad(set_to_none=True)

    a, b = {}, {}
    step(ref, a)
    step(sharded, b)

    def rel(k):
        return ((a[k] - b[k]).norm() / a[k].norm()).item()

    errs = {k: rel(k) for k in a}
    ms_ref = time_ms(lambda: step(ref), dev, warmup=2, reps=10)
    ms_sh = time_ms(lambda: step(sharded), dev, warmup=2, reps=10)
    print(f"world {env.world_size} backend {env.backend} device {dev}: relative errors {errs}")
    print(
        f"fwd+bwd {args.tokens} tokens, {args.n_experts} experts, d {args.d_model}: one-device layer "
        f"{ms_ref:.2f} ms, column-sharded path {ms_sh:.2f} ms"
    )
    ok = all(v < 3e-2 for v in errs.values())
    print("OK" if ok else "MISMATCH")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
