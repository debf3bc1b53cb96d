"""Column-sliced Triton mixing (torchpeer/ops/expert_mixing/triton_cols_*.py) vs float64 references.

Each phase against its PyTorch spec (columns_reference.py); then W column slices run in lock step in
one process (the all-reduces are sums over the slices) against expert_mix_reference's forward and
gradients, and, with the fused lazy Adam (row-wise and element-wise second moments), against the
optimizer's spec, lazy Adam by hand and the one-GPU fused kernel. Tiny sizes: the kernels run in
Triton's interpreter on the CPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from tests.references import LazyAdam64, rel_err  # noqa: E402
from torchpeer.ops import expert_mix_reference  # noqa: E402
from torchpeer.ops.expert_mixing import columns_reference as ref  # noqa: E402
from torchpeer.ops.expert_mixing import triton_cols_op as cols  # noqa: E402
from torchpeer.ops.expert_mixing import triton_op as mixing  # noqa: E402
from torchpeer.ops.expert_mixing.triton_fused_op import expert_mix_rowwise_adam  # noqa: E402
from torchpeer.optim.rowwise_adam import RowwiseAdamState, rowwise_adam_update_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"tile": 128, "num_warps": {1024: 4}}  # BLOCK_C 16 -> BLOCK_S 8; BLOCK_C 32 -> 4


def small_tiles(monkeypatch, segment):
    monkeypatch.setattr(mixing, "TUNING", {"fwd": SMALL, "expert": dict(SMALL, segment=segment), "dx": SMALL})


def inputs(T, H, K, d, N, seed=0, skew=0.0, x_dtype=torch.float32):
    """x (T, d), down (N, d) / d^(1/4) (both GELU regimes), up, indices (half the experts never
    picked; a fraction `skew` of the selections on experts 0 and 1), gates > 0, dy."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen)
    down = torch.randn(N, d, generator=gen) / d**0.25
    up = torch.randn(N, d, generator=gen)
    idx = torch.randint(0, N // 2, (T, H, K), generator=gen)
    if skew:
        hot = torch.rand(idx.shape, generator=gen) < skew
        idx[hot] = torch.randint(0, 2, (int(hot.sum()),), generator=gen)
    gates = torch.rand(T, H, K, generator=gen) + 0.1
    dy = torch.randn(T, d, generator=gen)
    to = dict(device=DEVICE)
    return x.to(DEVICE, x_dtype), down.to(**to), up.to(**to), idx.to(**to), gates.to(**to), dy.to(DEVICE, x_dtype)


@pytest.mark.parametrize("activation,segment,skew", [("gelu", None, 0.0), ("relu", 8, 0.7)])
def test_each_phase_matches_its_float64_spec(monkeypatch, activation, segment, skew):
    """Columns 8..24 of d = 40 (a strided view of x, as x[:, cols] is), ragged T, hot experts split
    into segments (segment 8, 70% of the selections on two experts) or not."""
    small_tiles(monkeypatch, segment)
    x, down, up, idx, gates, dy = inputs(13, 2, 3, 40, 24, skew=skew)
    sl = slice(8, 24)
    xc, dyc = x[:, sl], dy[:, sl].contiguous()
    down_c, up_c = down[:, sl].contiguous(), up[:, sl]  # a strided table too
    h_full = ref.column_dots_reference(x.double(), down.double(), idx)
    dbl = [t.double() for t in (xc, down_c, up_c, gates, dyc)]

    assert rel_err(cols.column_dots(xc, down_c, idx), ref.column_dots_reference(dbl[0], dbl[1], idx)) < 1e-6
    h = h_full.float()
    got = cols.column_rows(h, gates, up_c, idx, activation, torch.float32)
    assert rel_err(got, ref.column_rows_reference(h.double(), dbl[3], dbl[2], idx, activation)) < 1e-6

    plan = cols.expert_plan(idx, 24, 16)
    assert (plan.hot.numel() > 0) == (segment is not None)
    d_up = torch.full((24, 16), float("nan"), device=DEVICE)  # every row written, unpicked ones zero
    s = cols.column_up_pass(plan, dyc, up_c, gates, h, activation, 0.5, grad=d_up)
    s_ref, dv_ref = ref.column_up_pass_reference(dbl[4], dbl[2], idx, dbl[3], h.double(), activation, 0.5)
    assert rel_err(s, s_ref) < 1e-6

    s_full = s * 3.0  # stands for the all-reduced dots
    coef, dgate, dx = cols.column_token_pass(s_full, gates, h, down_c, idx, activation, 0.25, torch.float32)
    coef_ref, dgate_ref, dx_ref = ref.column_token_pass_reference(
        s_full.double(), dbl[3], h.double(), dbl[1], idx, activation, 0.25
    )
    for a, b in ((coef, coef_ref), (dgate, dgate_ref), (dx, dx_ref)):
        assert rel_err(a, b) < 1e-6

    d_down = torch.full((24, 16), float("nan"), device=DEVICE)
    cols.column_down_pass(plan, xc, coef, 0.5, grad=d_down)
    cols.column_reduce(plan, d_down, d_up)
    assert rel_err(d_up, dv_ref) < 1e-6
    assert rel_err(d_down, ref.column_down_pass_reference(dbl[0], coef.double(), idx, 24, 0.5)) < 1e-6
    assert (d_down[12:] == 0).all() and (d_up[12:] == 0).all()  # experts 12.. were never picked


def lockstep_mix(x, down, up, idx, gates, dy, activation, world):
    """The composed column path of `world` ranks, run slice after slice in one process: the
    all-reduces are sums over the slices. -> y, dx, d_down, d_up, dgate (full tables' columns)."""
    d = x.shape[1]
    sls = [slice(r * d // world, (r + 1) * d // world) for r in range(world)]
    dc = [down[:, sl].contiguous() for sl in sls]
    uc = [up[:, sl].contiguous() for sl in sls]
    h = sum(cols.column_dots(x[:, sl], dc[r], idx) for r, sl in enumerate(sls))
    y = torch.cat([cols.column_rows(h, gates, uc[r], idx, activation, x.dtype) for r in range(world)], 1)
    plans = [cols.expert_plan(idx, down.shape[0], d // world) for _ in sls]
    d_up = [torch.empty_like(t) for t in uc]
    s = sum(
        cols.column_up_pass(plans[r], dy[:, sl], uc[r], gates, h, activation, grad=d_up[r]) for r, sl in enumerate(sls)
    )
    outs = [cols.column_token_pass(s, gates, h, dc[r], idx, activation, 1.0, x.dtype) for r in range(world)]
    d_down = [torch.empty_like(t) for t in dc]
    for r, sl in enumerate(sls):
        cols.column_down_pass(plans[r], x[:, sl], outs[r][0], grad=d_down[r])
        cols.column_reduce(plans[r], d_down[r], d_up[r])
    dx = torch.cat([o[2] for o in outs], 1)
    return y, dx, torch.cat(d_down, 1), torch.cat(d_up, 1), outs[0][1]


@pytest.mark.parametrize("world", [2, 4])  # (one slice, the whole row: test_each_phase_matches_its_float64_spec)
def test_column_slices_in_lockstep_equal_expert_mix(monkeypatch, world):
    small_tiles(monkeypatch, 8)
    x, down, up, idx, gates, dy = inputs(11, 2, 3, 32, 20, seed=world, skew=0.5)
    y, dx, d_down, d_up, dgate = lockstep_mix(x, down, up, idx, gates, dy, "gelu", world)
    leaves = [t.double().requires_grad_() for t in (x, down, up, gates)]
    y_ref = expert_mix_reference(leaves[0], leaves[1], leaves[2], idx, leaves[3], "gelu")
    y_ref.backward(dy.double())
    for got, want in ((y, y_ref), (dx, leaves[0].grad), (d_down, leaves[1].grad), (d_up, leaves[2].grad)):
        assert rel_err(got, want) < 1e-5
    assert rel_err(dgate, leaves[3].grad) < 1e-5


def test_bf16_activations_fp32_tables(monkeypatch):
    """The training dtypes: bf16 x and dy (the gathered activations), fp32 master tables."""
    small_tiles(monkeypatch, None)
    x, down, up, idx, gates, dy = inputs(9, 2, 4, 32, 16, seed=5, x_dtype=torch.bfloat16)
    y, dx, d_down, d_up, dgate = lockstep_mix(x, down, up, idx, gates, dy, "gelu", 2)
    assert y.dtype == dx.dtype == torch.bfloat16 and d_down.dtype == torch.float32
    leaves = [t.double().requires_grad_() for t in (x, down, up, gates)]
    expert_mix_reference(leaves[0], leaves[1], leaves[2], idx, leaves[3], "gelu").backward(dy.double())
    for got, want in ((dx, leaves[0].grad), (d_down, leaves[1].grad), (d_up, leaves[2].grad), (dgate, leaves[3].grad)):
        assert rel_err(got, want) < 2e-2


def test_deterministic_bitwise(monkeypatch):
    small_tiles(monkeypatch, 4)
    args = inputs(9, 2, 3, 16, 12, seed=3, skew=0.6)
    a = lockstep_mix(*args, "relu", 2)
    b = lockstep_mix(*args, "relu", 2)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def hyper(lr, wd=0.1):
    return torch.tensor([lr, 0.9, 0.99, 1e-8, wd], dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("elementwise", [False, True], ids=["rowwise", "elementwise"])
@pytest.mark.parametrize("segment,skew", [(None, 0.0), (4, 0.8)])
def test_fused_rowwise_adam_in_column_slices(monkeypatch, segment, skew, elementwise):
    """Two slices in lock step, two steps: every table row and moment equals the spec's
    (rowwise_adam_update_ on the full float64 gradient), lazy Adam's by hand and the one-GPU fused
    kernel's; a row-wise second moment and the step counts, kept whole by every slice, equal them
    too; an element-wise second moment is each slice's columns of theirs (no all-reduce, no apply)."""
    small_tiles(monkeypatch, segment)
    world, N, d = 2, 12, 32  # (T = 9, 54 selections over 6 rows: hot lists of ~20 under skew)
    x0, down, up, *_ = inputs(1, 1, 1, d, N, seed=7)
    full = [down.clone(), up.clone()]  # the one-GPU fused kernel's tables
    spec = [down.double(), up.double()]
    st_full = [RowwiseAdamState.zeros_like(t, elementwise=elementwise) for t in full]
    st_spec = [RowwiseAdamState.zeros_like(t, elementwise=elementwise) for t in spec]
    by_hand = [LazyAdam64(t, elementwise) for t in spec]
    sls = [slice(r * d // world, (r + 1) * d // world) for r in range(world)]
    mine = [[down[:, sl].contiguous(), up[:, sl].contiguous()] for sl in sls]
    st = [[RowwiseAdamState.zeros_like(t, elementwise=elementwise) for t in pair] for pair in mine]
    for step in range(2):
        x, _, _, idx, gates, dy = inputs(9, 2, 3, d, N, seed=10 + step, skew=skew)
        hp = hyper(1e-2 * (step + 1))
        h = sum(cols.column_dots(x[:, sl], mine[r][0], idx) for r, sl in enumerate(sls))
        plans = [cols.expert_plan(idx, N, d // world, fused=True) for _ in sls]
        sq = [torch.zeros(2, N, device=DEVICE) for _ in sls]
        s = sum(
            cols.column_up_pass(
                plans[r], dy[:, sl], mine[r][1], gates, h, "gelu", moment=(mine[r][1], st[r][1], sq[r][1], hp)
            )
            for r, sl in enumerate(sls)
        )
        dx = []
        for r, sl in enumerate(sls):
            coef, _, dxr = cols.column_token_pass(s, gates, h, mine[r][0], idx, "gelu", 1.0, x.dtype)
            dx.append(dxr)
            cols.column_down_pass(plans[r], x[:, sl], coef, moment=(mine[r][0], st[r][0], sq[r][0], hp))
            cols.column_reduce_moments(plans[r], *mine[r], *st[r], sq[r], hp)
        sq_all = sum(sq)
        assert elementwise == (sq_all == 0).all()  # element-wise: nothing to all-reduce
        for r in range(world) if not elementwise else ():
            cols.column_adam_apply(plans[r], sq_all, *mine[r], *st[r], hp, d)

        xg = x.clone().requires_grad_()
        expert_mix_rowwise_adam(xg, *full, idx, gates, "gelu", *st_full, hp).backward(dy)
        leaves = [t.clone().requires_grad_() for t in spec]
        xr = x.double().requires_grad_()
        expert_mix_reference(xr, *leaves, idx, gates.double(), "gelu").backward(dy.double())
        rows = idx.reshape(-1).unique()
        for table, leaf, state, hand in zip(spec, leaves, st_spec, by_hand):
            rowwise_adam_update_(table, state, rows, leaf.grad[rows], 1e-2 * (step + 1), (0.9, 0.99), 1e-8, 0.1)
            hand.step(leaf.grad, rows, 1e-2 * (step + 1))
        assert rel_err(torch.cat(dx, 1), xr.grad) < 1e-5
        for k in range(2):
            table = torch.cat([mine[r][k] for r in range(world)], 1)
            m = torch.cat([st[r][k].exp_avg for r in range(world)], 1)
            assert rel_err(table, spec[k]) < 1e-5 and rel_err(table, full[k]) < 1e-6
            assert rel_err(table, by_hand[k].w) < 1e-5
            assert rel_err(m, st_spec[k].exp_avg) < 1e-5 and rel_err(m, st_full[k].exp_avg) < 1e-6
            for r in range(world):
                v_spec = st_spec[k].exp_avg_sq[:, sls[r]] if elementwise else st_spec[k].exp_avg_sq
                assert rel_err(st[r][k].exp_avg_sq, v_spec) < 1e-4
                assert torch.equal(st[r][k].steps, st_spec[k].steps)
        assert torch.equal(mine[0][0][N // 2 :], down[N // 2 :, sls[0]])  # never picked: unchanged
    assert int(st[0][0].steps.max()) == 2 and int(st[0][0].steps.min()) == 0


def test_empty_batch():
    x, down, up, idx, gates, dy = inputs(0, 2, 3, 16, 8)
    y, h = cols.column_mix_forward(x, down, up, idx, gates, "gelu")
    dx, d_down, d_up, dgate = cols.column_mix_backward(dy, x, down, up, idx, gates, h, "gelu")
    assert y.shape == (0, 16) and dx.shape == (0, 16) and dgate.shape == (0, 2, 3)
    assert (d_down == 0).all() and (d_up == 0).all()
