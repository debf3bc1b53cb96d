"""Workers of the torch-path cases of test_sharded_triton.py (module level so that spawned processes can
import them; triton_workers.check_all runs them in the same spawn as the Triton-path cases)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from torchpeer.parallel.collectives import ShardContext
from torchpeer.parallel.sharded_layers import shard_layer_, sharded_tables


def make_layer(kind: str):
    from torchpeer.layers.peer import PEER
    from torchpeer.layers.pkm import PKM

    torch.manual_seed(0)
    if kind == "peer":
        layer = PEER(d_model=16, n_experts=64, heads=2, top_k=4, d_key=8, query_norm="batch", backend="torch")
    elif kind == "peer_ema":  # running statistics updated from the (gathered) batch
        layer = PEER(d_model=16, n_experts=64, heads=2, top_k=4, d_key=8, query_norm="ema", backend="torch")
    elif kind == "peer_relu_layernorm":
        layer = PEER(d_model=16, n_experts=64, heads=3, top_k=3, d_key=8, query_norm="layer", activation="relu")
    else:
        layer = PKM(d_model=16, n_keys=8, heads=2, top_k=4, d_key=8, value_dim=8)
    return layer.double()


def batch(world: int, counts: list[int] | None):
    total = sum(counts) if counts is not None else 6 * world
    g = torch.Generator().manual_seed(1)
    x = torch.randn(total, 16, generator=g, dtype=torch.float64)
    r = torch.randn(total, 16, generator=g, dtype=torch.float64)
    return x, r


def single_process(kind: str, x: torch.Tensor, r: torch.Tensor):
    """Reference: the unsharded layer on the whole batch, loss = sum(y * r) / T."""
    layer = make_layer(kind).train()
    layer.enable_usage_tracking(True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    ((y * r).sum() / x.shape[0]).backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    return y.detach(), x.grad, grads, buffers, layer.usage_tracker.scores.clone()


def check_layer(rank: int, world: int, kind: str, counts: list[int] | None, out_dir: str) -> None:
    """Sharded forward/backward on this rank's tokens == the single-process layer's (float64)."""
    rt, at = 1e-9, 1e-12
    x, r = batch(world, counts)
    y_ref, dx_ref, g_ref, buf_ref, usage_ref = single_process(kind, x, r)
    ctx = ShardContext(dist.group.WORLD, rank, world, counts)
    layer = shard_layer_(make_layer(kind).train(), ctx)
    layer.enable_usage_tracking(True)
    sizes = ctx.token_counts(x.shape[0] // world)
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    x_local = x[sl].clone().requires_grad_(True)
    y = layer(x_local)
    torch.testing.assert_close(y.detach(), y_ref[sl], rtol=rt, atol=at)
    # usage: retrieval ran on the gathered batch, so every rank counted every token
    torch.testing.assert_close(layer.usage_tracker.scores, usage_ref, rtol=rt, atol=at)
    for name, b in layer.named_buffers():  # BatchNorm statistics of the global batch
        torch.testing.assert_close(b, buf_ref[name], rtol=rt, atol=at, msg=name)
    if counts is None:  # training batches are even: check the backward
        ((y * r[sl]).sum() / sizes[rank]).backward()  # this rank's mean; DDP averages over ranks
        # per-token gradients are in local units: W x the global-mean gradient
        torch.testing.assert_close(x_local.grad / world, dx_ref[sl], rtol=rt, atol=at)
        tables = sharded_tables(layer)
        assert tables
        for name, p in layer.named_parameters():
            if name in tables:
                cols = ctx.columns(g_ref[name].shape[1])
                torch.testing.assert_close(p.grad, g_ref[name][:, cols], rtol=rt, atol=at, msg=name)
            else:
                g = p.grad.clone()
                dist.all_reduce(g)
                torch.testing.assert_close(g / world, g_ref[name], rtol=rt, atol=at, msg=name)
                if not name.startswith("out_proj"):  # the replicated part: global gradient on every rank
                    torch.testing.assert_close(p.grad, g_ref[name], rtol=rt, atol=at, msg=name)
    if rank == 0:
        open(f"{out_dir}/ok_{kind}_{world}_{counts}", "w").close()


def check_layers(rank: int, world: int, cases: list, out_dir: str) -> None:
    for kind, counts in cases:
        if kind == "autocast":
            check_autocast(rank, world, out_dir)
        elif kind == "usage":
            check_usage_union(rank, world, out_dir)
        else:
            check_layer(rank, world, kind, counts, out_dir)


def check_autocast(rank: int, world: int, out_dir: str) -> None:
    """Under bf16 autocast (the GPU training dtype, here on the CPU) the sharded PEER runs in the
    compute dtype and matches the one-process layer to bf16 accuracy, gradients included."""
    from torchpeer.layers.peer import PEER

    torch.manual_seed(0)
    ref = PEER(d_model=32, n_experts=64, heads=2, top_k=4, d_key=8, query_norm="batch", backend="torch")
    layer = PEER(d_model=32, n_experts=64, heads=2, top_k=4, d_key=8, query_norm="batch", backend="torch")
    layer.load_state_dict(ref.state_dict())
    ctx = ShardContext(dist.group.WORLD, rank, world)
    shard_layer_(layer, ctx)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8 * world, 32, generator=g)
    r = torch.randn(8 * world, 32, generator=g)
    sl = slice(8 * rank, 8 * (rank + 1))
    xr = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref = ref(xr)
    ((y_ref.float() * r).sum() / x.shape[0]).backward()
    xl = x[sl].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xl)
    assert y.dtype == y_ref.dtype == torch.bfloat16
    ((y.float() * r[sl]).sum() / 8).backward()
    torch.testing.assert_close(y.float(), y_ref[sl].float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(xl.grad / world, xr.grad[sl], rtol=5e-2, atol=5e-3)
    cols = ctx.columns(32)
    torch.testing.assert_close(layer.down.grad, ref.down.grad[:, cols], rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(layer.up.grad, ref.up.grad[:, cols], rtol=5e-2, atol=5e-3)
    assert layer.down.grad.dtype == torch.float32  # fp32 master tables keep fp32 gradients
    if rank == 0:
        open(f"{out_dir}/ok_autocast_{world}", "w").close()


def check_usage_union(rank: int, world: int, out_dir: str) -> None:
    """A router that saw only this rank's tokens (e.g. a data-parallel MoE): after the plan's
    reduction, usage counts the union of the experts selected on all ranks, KL their summed mass."""
    from torch import nn

    from torchpeer.diagnostics import RoutingStats, UsageTrackingMixin, routing_report, usage_report
    from torchpeer.parallel import DistributedPlan

    class Router(UsageTrackingMixin, nn.Module):
        n_experts = 10

    picks = [torch.tensor([[0, 1], [2, 2]]), torch.tensor([[2, 3], [3, 7]])] + [torch.tensor([[9, 9]])] * (world - 2)
    weights = [torch.rand(p.shape, generator=torch.Generator().manual_seed(s)) + 0.1 for s, p in enumerate(picks)]
    plan = DistributedPlan()
    plan.setup(torch.device("cpu"))
    model = nn.Sequential(Router())
    model[0].enable_usage_tracking(True)
    model[0]._track_routing(None, picks[rank].unsqueeze(1), weights[rank].unsqueeze(1))
    plan.reduce_usage_(model)
    ref = RoutingStats(10)  # one process seeing every rank's selections
    for p, w in zip(picks, weights):
        ref.update_routing(None, p.unsqueeze(1), w.unsqueeze(1))  # (tokens, heads=1, k)
    got, want = usage_report(model)["0"], ref.summary()
    assert got["usage_pct"] == want["usage_pct"] and abs(got["kl"] - want["kl"]) < 1e-12, (got, want)
    for key, value in routing_report(model)["0"].items():  # head usage, gate entropy, ... merged too
        assert abs(value - want[key]) <= 1e-9 * max(1.0, abs(want[key])), (key, value, want[key])
    if rank == 0:
        open(f"{out_dir}/ok_usage_{world}", "w").close()
