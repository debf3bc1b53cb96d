"""The fused lazy Adam on a shared pool (triton_deferred_op.py through RowwiseTableAdam): several layers
read one pair of tables, their backwards keep their selections, step() updates the pool once.

Against the spec (rowwise_adam_update_) and lazy Adam by hand (tests/references.py LazyAdam64) applied
to the pool's gradient that plain autograd sums over the layers (expert_mix_reference in float64 on
the same tables), as tests/ops/test_rowwise_adam.py does for one layer: step for step, a row chosen by
two layers in one step takes ONE step, rows nobody chose stay bitwise unchanged.
"""

import pytest
import torch

pytest.importorskip("triton")

from tests.ops.test_rowwise_adam import DEVICE, SMALL  # noqa: E402 (sets TRITON_INTERPRET on the CPU)
from tests.references import LazyAdam64, rel_err  # noqa: E402
from torchpeer.layers.expert_pool import ExpertPool  # noqa: E402
from torchpeer.ops import expert_mix_reference  # noqa: E402
from torchpeer.ops.expert_mixing import triton_op as mixing  # noqa: E402
from torchpeer.optim import RowwiseTableAdam  # noqa: E402
from torchpeer.optim.rowwise_adam import RowwiseAdamState, rowwise_adam_update_  # noqa: E402

N, D = 24, 24  # d 24: BLOCK_D 32, the kernels' masked lanes


class PoolReader(torch.nn.Module):
    """What the optimizer sees of a PEER layer on a shared pool: ``pool``, its tables as down/up,
    and the table_update hook (routing comes from the test)."""

    def __init__(self, pool):
        super().__init__()
        object.__setattr__(self, "pool", pool)  # not a submodule, as in PEER
        self.table_update = None

    down = property(lambda self: self.pool.down)
    up = property(lambda self: self.pool.up)

    def forward(self, x, idx, gates):
        return self.table_update(x, self.down, self.up, idx, gates, "gelu")


def stack(readers, x, routes, tables=None):
    """x -> the residual stack h <- h + layer(h) over the readers; with tables (down, up): the plain
    autograd path instead (expert_mix_reference on them, in their dtype)."""
    h = x
    for layer, (idx, g) in zip(readers, routes):
        h = h + (layer(h, idx, g) if tables is None else expert_mix_reference(h, *tables, idx, g.to(h.dtype)))
    return h


@pytest.mark.parametrize("elementwise,bf16", [(False, False), (True, True)], ids=["rowwise", "elementwise_bf16"])
def test_one_update_of_the_pool_from_three_layers_matches_the_spec(monkeypatch, elementwise, bf16):
    monkeypatch.setattr(mixing, "TUNING", {"fwd": SMALL, "expert": dict(SMALL, segment=4), "dx": SMALL})
    torch.manual_seed(0)
    pool = ExpertPool(N, D).to(DEVICE)
    readers = [PoolReader(pool) for _ in range(3)]
    opt = RowwiseTableAdam(
        {f"l{i}": r for i, r in enumerate(readers)}, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1,
        bf16_tables=bf16, elementwise=elementwise, pools={"pool": pool},
    )  # fmt: skip
    assert list(opt.states) == ["pool"]  # the state exists once, under the pool
    weights = [s.master if bf16 else t for s, t in zip(opt.states["pool"], (pool.down, pool.up))]
    ref = [w.detach().double().clone() for w in weights]
    ref_states = [RowwiseAdamState.zeros_like(t, elementwise=elementwise) for t in ref]
    by_hand = [LazyAdam64(t, elementwise) for t in ref]
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        lr = 1e-2 * (1 + step)
        opt.set_lr(lr)
        x = torch.randn(7, D, generator=gen).to(DEVICE).requires_grad_()
        routes = []
        for first in (0, 4, 8):  # layer l picks from rows first..first+7: rows 4-11 by two layers, 16-23 by none
            idx = torch.randint(first, first + 8, (7, 2, 2), generator=gen)
            idx[:, :, 1] = idx[:, :, 0]  # repeated inside a head too
            routes.append((idx.to(DEVICE), (torch.rand(7, 2, 2, generator=gen) + 0.1).to(DEVICE)))
        dy = torch.randn(7, D, generator=gen).to(DEVICE)
        read = [t.detach().double().clone() for t in (pool.down, pool.up)]  # what the forward reads
        before = [t.detach().clone() for t in weights]

        stack(readers, x, routes).backward(dy)
        assert opt.deferred["pool"].pending == 3 and all(torch.equal(t, b) for t, b in zip(weights, before))
        opt.step()
        assert opt.deferred["pool"].pending == 0

        leaves = [t.requires_grad_() for t in read]
        x_ref = x.detach().double().requires_grad_()
        stack(readers, x_ref, routes, leaves).backward(dy.double())
        assert rel_err(x.grad, x_ref.grad) < 1e-5  # every layer's dx from the unchanged tables
        chosen = [set(idx.reshape(-1).tolist()) for idx, _ in routes]
        assert chosen[0] & chosen[1] and chosen[1] & chosen[2]  # rows that two layers chose this step
        rows = torch.cat([idx.reshape(-1) for idx, _ in routes]).unique()
        for table, leaf, state, hand in zip(ref, leaves, ref_states, by_hand):
            rowwise_adam_update_(table, state, rows, leaf.grad[rows], lr, (0.9, 0.99), 1e-8, 0.1)
            hand.step(leaf.grad, rows, lr)
        untouched = torch.ones(N, dtype=torch.bool, device=DEVICE)
        untouched[rows] = False
        assert untouched[16:].all()
        for w, b, table, s, sr, hand in zip(weights, before, ref, opt.states["pool"], ref_states, by_hand):
            assert torch.equal(w[untouched], b[untouched])
            assert rel_err(w, table) < 1e-5 and rel_err(w, hand.w) < 1e-5, step
            assert s.steps.tolist() == hand.t and torch.equal(s.steps, sr.steps)  # one step per row and update
            assert rel_err(s.exp_avg, sr.exp_avg) < 1e-5 and rel_err(s.exp_avg_sq, sr.exp_avg_sq) < 1e-4
    assert max(opt.states["pool"][0].steps.tolist()) == 2
    if bf16:  # the working tables follow the masters (the interpreter truncates: within one bf16 ulp)
        for t, s in zip((pool.down, pool.up), opt.states["pool"]):
            assert ((t.float() - s.master).abs() <= s.master.abs() * 2.0**-7).all()


def test_a_second_backward_before_step_and_torchrun_are_refused():
    pool = ExpertPool(N, D).to(DEVICE)
    readers = [PoolReader(pool), PoolReader(pool)]
    opt = RowwiseTableAdam({"a": readers[0], "b": readers[1]}, lr=1e-2, pools={"p": pool})
    x = torch.randn(3, D, device=DEVICE, requires_grad=True)
    idx, g = torch.randint(0, N, (3, 1, 2), device=DEVICE), torch.rand(3, 1, 2, device=DEVICE)
    readers[0](x, idx, g).sum().backward()
    with pytest.raises(RuntimeError, match=r"call the table optimizer's step\(\) after every backward"):
        readers[0](x, idx, g).sum().backward()
    with pytest.raises(ValueError, match="column-sharded .torchrun. PEER has no deferred table update"):
        readers[0].table_update.table_state()
    with pytest.raises(ValueError, match="reads a shared pool that is not among pools="):
        RowwiseTableAdam({"a": PoolReader(ExpertPool(N, D))}, lr=1e-2)
    from torchpeer.layers.peer import PEER
    from torchpeer.optim import fused_tables

    square = ExpertPool(16, D)  # (PEER's n_experts is a perfect square)
    model = torch.nn.Sequential(*(PEER(D, 16, heads=1, top_k=2, d_key=4, shared_pool=True, pool=square) for _ in "ab"))
    with pytest.MonkeyPatch.context() as mp, pytest.raises(ValueError, match="shared pool: its fused update runs"):
        mp.setattr(fused_tables, "_other_ranks", lambda: True)  # as under torchrun
        fused_tables.attach_rowwise_adam(model, lr=1e-2)
    with torch.no_grad():  # an evaluation keeps nothing
        readers[1](x, idx, g)
    assert opt.deferred["p"].pending == 1
    opt.detach()
    assert pool.down.requires_grad and readers[0].table_update is None
