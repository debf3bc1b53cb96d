"""Workers of test_sharded_triton.py (module level so that spawned processes can import them); its
torch-path cases are layer_workers.py's, run by check_all in the same spawn.

The column-sliced Triton path of the sharded PEER layer (torchpeer/parallel/triton_mixing.py) runs
in Triton's interpreter (TRITON_INTERPRET=1, inherited from the test session) on gloo ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.parallel.layer_workers import batch, check_layers
from tests.references import rel_err
from torchpeer.parallel.collectives import ShardContext
from torchpeer.parallel.sharded_layers import shard_layer_

SMALL = {"tile": 128, "num_warps": {1024: 4}}  # BLOCK_C 4..16 -> BLOCK_S 8..32: hot experts split


def make_peer(kind: str, backend: str = "triton"):
    """A tiny PEER whose mixing runs on `backend`; retrieval on the "torch" backend (the Triton
    retrieval has its own tests; in the interpreter it would triple these tests' time)."""
    from torchpeer.layers.peer import PEER

    torch.manual_seed(0)
    if kind == "peer":
        layer = PEER(d_model=16, n_experts=16, heads=2, top_k=4, d_key=8, query_norm="batch", backend=backend)
    else:  # relu, three heads, the EMA query norm (the default), sigmoid gates
        kw = dict(heads=3, top_k=3, d_key=8, query_norm="ema", activation="relu", gate="sigmoid", backend=backend)
        layer = PEER(d_model=16, n_experts=16, **kw)
    layer.router.backend = "torch"
    return layer


def _run(layer, x, r, sl=None, fn=None):
    """Forward on x (my rows if sl) by fn (default the layer), loss sum(y * r) / rows; -> y, dx,
    {name: grad of layer's parameter}."""
    x = (x if sl is None else x[sl]).clone().requires_grad_(True)
    y = (layer if fn is None else fn)(x)
    ((y * (r if sl is None else r[sl])).sum() / x.shape[0]).backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def on_rank0(fn):
    """fn() computed on rank 0 and sent to every rank: the one-process references are the same on
    every rank, and in Triton's interpreter computing them once saves most of these tests' time."""
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_layer(rank: int, world: int, kind: str, segment, out_dir: str) -> None:
    """The sharded Triton layer (fp32) on my tokens == the one-process layer: its float64 reference
    (backend "reference") and its fp32 Triton run (the one-GPU kernels): output, dx, my columns of
    the table gradients, the router's gradients and statistics."""
    from torchpeer.ops.expert_mixing import triton_op

    triton_op.TUNING = {"fwd": SMALL, "expert": dict(SMALL, segment=segment), "dx": SMALL}
    x, r = batch(world, None)
    x, r = x.float(), r.float()
    f64 = make_peer(kind, "reference").double().train()
    y64, dx64, g64 = _run(f64, x.double(), r.double())

    def one_process():
        one = make_peer(kind).train()
        return (*_run(one, x, r), dict(one.named_buffers()))

    y1, dx1, g1, buf1 = on_rank0(one_process)
    ctx = ShardContext(dist.group.WORLD, rank, world)
    layer = shard_layer_(make_peer(kind).train(), ctx)
    assert layer.op_backends()["expert_mix"] == f"column_sharded_triton (world {world})"
    sl = slice(6 * rank, 6 * (rank + 1))
    y, dx, grads = _run(layer, x, r, sl)
    for got, want64, want1 in ((y, y64[sl], y1[sl]), (dx / world, dx64[sl], dx1[sl])):
        assert rel_err(got, want64) < 1e-5 and rel_err(got, want1) < 1e-5, (rel_err(got, want64), rel_err(got, want1))
    cols = ctx.columns(16)
    for name, g in grads.items():
        want64, want1 = (g64[name], g1[name]) if name not in ("down", "up") else (g64[name][:, cols], g1[name][:, cols])
        assert rel_err(g, want64) < 1e-5 and rel_err(g, want1) < 1e-5, name
    for name, b in layer.named_buffers():  # the query norm's statistics: those of the global batch
        torch.testing.assert_close(b, buf1[name], rtol=1e-5, atol=1e-6)
    if rank == 0:
        open(f"{out_dir}/ok_{kind}_{world}_{segment}", "w").close()


def check_rowwise_adam(rank: int, world: int, steps: int, elementwise: bool, out_dir: str) -> None:
    """RowwiseTableAdam on the sharded layer (the column-sliced fused update, hot experts split)
    == on the one-process layer (the one-GPU fused kernel): after `steps` steps with changing lrs,
    my columns of both tables and first moments, and the whole rows' second moments and step counts
    (elementwise: my columns of the per-element second moments)."""
    from torchpeer.ops.expert_mixing import triton_op
    from torchpeer.optim import RowwiseTableAdam

    triton_op.TUNING = {"fwd": SMALL, "expert": dict(SMALL, segment=8), "dx": SMALL}
    inputs = []
    for step in range(steps):
        x, r = batch(world, None)
        inputs.append((x.float() + step, r.float(), 1e-2 * (step + 1)))

    def one_process():
        one = make_peer("peer").train()
        opt_one = RowwiseTableAdam({"l": one}, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, elementwise=elementwise)
        dxs = []
        for x, r, lr in inputs:
            opt_one.set_lr(lr)
            dxs.append(_run(one, x, r)[1])
        return dxs, (one.down.detach(), one.up.detach()), opt_one.states["l"]

    dx1, tables1, states1 = on_rank0(one_process)
    ctx = ShardContext(dist.group.WORLD, rank, world)
    layer = shard_layer_(make_peer("peer").train(), ctx)
    opt = RowwiseTableAdam({"l": layer}, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, elementwise=elementwise)
    sl = slice(6 * rank, 6 * (rank + 1))
    for (x, r, lr), want in zip(inputs, dx1):
        opt.set_lr(lr)
        _, dx, _ = _run(layer, x, r, sl)
        assert rel_err(dx / world, want[sl]) < 1e-5
    cols = ctx.columns(16)
    for k, name in enumerate(("down", "up")):
        assert rel_err(getattr(layer, name), tables1[k][:, cols]) < 1e-6, name
        mine, full = opt.states["l"][k], states1[k]
        assert rel_err(mine.exp_avg, full.exp_avg[:, cols]) < 1e-5, name
        assert rel_err(mine.exp_avg_sq, full.exp_avg_sq[:, cols] if elementwise else full.exp_avg_sq) < 1e-5, name
        assert torch.equal(mine.steps, full.steps) and int(full.steps.max()) == steps
    assert layer.down.grad is None and layer.up.grad is None  # no table gradient on any rank
    if rank == 0:
        open(f"{out_dir}/ok_rowwise_{world}_{steps}" + ("_elementwise" if elementwise else ""), "w").close()


def check_compile(rank: int, world: int, out_dir: str) -> None:
    """torch.compile of (a) the sharded Triton layer alone, fullgraph (its collectives and kernels
    are custom ops: no graph break), and (b) DDP around a model holding one, wrapped as the trainer
    wraps it (DistributedPlan(shard_experts="always")): outputs, losses, every gradient == eager."""
    from torch import nn

    from torchpeer.parallel import DistributedPlan

    torch._dynamo.reset()
    x, r = batch(world, None)
    x, r = x.float(), r.float()
    sl = slice(6 * rank, 6 * (rank + 1))
    ctx = ShardContext(dist.group.WORLD, rank, world)
    eager, compiled = (shard_layer_(make_peer("peer").train(), ctx) for _ in range(2))
    want = _run(eager, x, r, sl)
    got = _run(compiled, x, r, sl, fn=torch.compile(compiled, backend="aot_eager", fullgraph=True))
    for a, b in zip(want[:2], got[:2]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for name, g in want[2].items():
        torch.testing.assert_close(got[2][name], g, rtol=1e-6, atol=1e-7, msg=name)

    plan = DistributedPlan(shard_experts="always")
    plan.setup(torch.device("cpu"))

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 16), make_peer("peer"), nn.Linear(16, 16))

    runs = []
    for compile_it in (False, True):
        model = plan.build_model(build, torch.device("cpu"))
        wrapped = plan.wrap_model(model)
        assert isinstance(wrapped, nn.parallel.DistributedDataParallel)
        fwd = torch.compile(wrapped, backend="aot_eager") if compile_it else wrapped
        losses = []
        for step in range(2):
            loss = (fwd(x[sl] + step) * r[sl]).sum() / 6
            loss.backward()
            losses.append(loss.detach())
        runs.append((losses, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l_eager, g_eager), (l_comp, g_comp) = runs
    torch.testing.assert_close(torch.stack(l_comp), torch.stack(l_eager), rtol=1e-6, atol=1e-7)
    for name, g in g_eager.items():  # DDP-averaged dense gradients, my columns of the tables
        torch.testing.assert_close(g_comp[name], g, rtol=1e-5, atol=1e-6, msg=name)
    if rank == 0:
        open(f"{out_dir}/ok_compile_{world}", "w").close()


def check_all(rank: int, world: int, cases: list, out_dir: str) -> None:
    """Each case in one spawn: ("torch", kind, counts) is layer_workers.py's (the torch path), the
    others this module's (the Triton path)."""
    for case in cases:
        if case[0] == "torch":
            check_layers(rank, world, [case[1:]], out_dir)
        elif case[0] == "layer":
            check_layer(rank, world, case[1], case[2], out_dir)
        elif case[0] == "rowwise":  # ("rowwise", steps, elementwise)
            check_rowwise_adam(rank, world, case[1], case[2], out_dir)
        else:
            check_compile(rank, world, out_dir)
