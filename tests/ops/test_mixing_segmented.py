"""The skew-robust (segmented) mixing backward: hot experts' selection lists split across programs.

Under TRITON_INTERPRET=1 on the CPU at tiny sizes, against the float64 reference and against the
same kernels with splitting switched off (one segment per expert, i.e. the previous kernel).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from tests.ops.test_mixing_triton import check_against_float64, make_inputs  # noqa: E402
from torchpeer.ops.expert_mixing import triton_op as mixing  # noqa: E402
from torchpeer.ops.expert_mixing.triton_op import expert_mix_triton  # noqa: E402

# BLOCK_D = 32 -> BLOCK_S = 4 rows per tile: segments of a few blocks, many of them per hot expert
SMALL = {"tile": 128, "num_warps": {1024: 4}}


@pytest.fixture(autouse=True)
def exact_split_decisions(monkeypatch):
    """These tests count on the split decision of each call itself (on CUDA the library answers
    from an earlier call's count: test_lagged_split_check_* below)."""
    check = mixing.LaggedSplitCheck()
    monkeypatch.setattr(mixing, "_needs_split", lambda offsets, seg: check(offsets, seg, lagged=False))


def tuning(segment):
    return {"fwd": SMALL, "expert": dict(SMALL, segment=segment), "dx": SMALL}


def skewed(indices, n_hot, frac, seed):
    """Send about `frac` of the selections to experts 0..n_hot-1 (a collapsed router)."""
    gen = torch.Generator().manual_seed(seed)
    hot = torch.rand(indices.shape, generator=gen) < frac
    indices[hot] = torch.randint(0, n_hot, (int(hot.sum()),), generator=gen).to(indices.device)
    return indices


def grads_with(inputs, dy, monkeypatch, tuning_dict):
    """(y, dx, ddown, dup, dgates) of expert_mix_triton on fresh copies of inputs under tuning_dict."""
    monkeypatch.setattr(mixing, "TUNING", tuning_dict)
    x, down, up, indices, gates = (t.detach().clone() for t in inputs)
    for t in (x, down, up, gates):
        t.requires_grad_()
    y = expert_mix_triton(x, down, up, indices, gates)
    y.backward(dy)
    return y, x.grad, down.grad, up.grad, gates.grad


def grads(inputs, dy, segment, monkeypatch):
    return grads_with(inputs, dy, monkeypatch, tuning(segment))


def test_segment_plan_matches_a_python_loop():
    counts = torch.tensor([0, 3, 9, 1, 17, 8, 0, 2])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    seg = 4
    nseg, pbase, seg_expert, seg_index, hot = mixing._segment_plan(offsets, int(counts.sum()), seg)
    want = []  # (expert, segment) of every extra segment, in expert then segment order
    for e, c in enumerate(counts.tolist()):
        want += [(e, i) for i in range(1, max(1, -(-c // seg)))]
    got = [(e, i) for e, i in zip(seg_expert.tolist(), seg_index.tolist()) if e >= 0]
    assert got == want
    assert seg_expert.numel() >= len(want)  # the shape-only bound holds
    assert nseg.tolist() == [max(1, -(-c // seg)) for c in counts.tolist()]
    assert [e for e in hot.tolist() if e >= 0] == [2, 4, 5]  # experts with more than 4 selections
    for e in (2, 4, 5):  # partial slots of a hot expert are its extra segments, contiguous
        slots = [q for q, (ee, _) in enumerate(want) if ee == e]
        assert slots == list(range(int(pbase[e]), int(pbase[e]) + int(nseg[e]) - 1))


@pytest.mark.parametrize("segment", [4, 8, 12])
def test_skewed_routing_matches_float64_reference(segment, monkeypatch):
    """90% of the selections on 3 of 40 experts: each hot expert owns ~30 selections -> many
    segments, ragged last segments (segment 12 is rounded up to 3 whole blocks of 4)."""
    monkeypatch.setattr(mixing, "TUNING", tuning(segment))
    inputs, dy = make_inputs(23, 2, 3, 32, 40, seed=11)
    skewed(inputs[3], 3, 0.9, seed=12)
    check_against_float64(inputs, dy, "gelu", tol=1e-5)


def test_uniform_routing_matches_float64_reference(monkeypatch):
    monkeypatch.setattr(mixing, "TUNING", tuning(4))
    inputs, dy = make_inputs(17, 2, 3, 24, 64, seed=13)
    check_against_float64(inputs, dy, "relu", tol=1e-5)


def test_splitting_changes_only_the_hot_rows_summation(monkeypatch):
    """Against the unsplit kernel (segment larger than any list = the previous kernel): y, dx,
    dgates and every cold expert's rows are bitwise equal; hot rows equal up to fp32 reassociation."""
    inputs, dy = make_inputs(15, 2, 4, 32, 24, seed=14)
    skewed(inputs[3], 2, 0.8, seed=15)
    split = grads(inputs, dy, 8, monkeypatch)
    whole = grads(inputs, dy, 1 << 20, monkeypatch)
    counts = torch.bincount(inputs[3].reshape(-1).cpu(), minlength=24)
    cold = counts <= 8
    assert (~cold).sum() == 2 and cold.sum() == 22
    for a, b in zip((split[0], split[1], split[4]), (whole[0], whole[1], whole[4])):
        assert torch.equal(a, b)
    for a, b in zip(split[2:4], whole[2:4]):
        assert torch.equal(a[cold], b[cold])
        assert torch.allclose(a[~cold], b[~cold], rtol=1e-5, atol=1e-6)
        assert not torch.equal(a[~cold], torch.zeros_like(a[~cold]))


def test_segmented_backward_is_bitwise_deterministic(monkeypatch):
    inputs, dy = make_inputs(21, 2, 3, 16, 12, seed=16)
    skewed(inputs[3], 2, 0.9, seed=17)
    first = grads(inputs, dy, 4, monkeypatch)
    second = grads(inputs, dy, 4, monkeypatch)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bf16_tables_under_skew(monkeypatch):
    """bf16 tables and activations: the hot rows' first segment is rounded to bf16 before the
    partials are added (documented); still within bf16 tolerance of the float64 reference."""
    monkeypatch.setattr(mixing, "TUNING", tuning(4))
    inputs, dy = make_inputs(19, 2, 3, 32, 12, dtype=torch.bfloat16, seed=18)
    skewed(inputs[3], 2, 0.9, seed=19)
    check_against_float64(inputs, dy, "gelu", tol=2e-2)


def test_every_output_element_is_written_under_skew(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mixing, "TUNING", tuning(4))
    monkeypatch.setattr(mixing, "_new_buffer", poisoned)
    (x, down, up, indices, gates), dy = make_inputs(15, 2, 3, 20, 20, seed=20)
    indices.remainder_(12)  # experts 12.. unused: zero rows
    skewed(indices, 2, 0.7, seed=21)
    y = expert_mix_triton(x, down, up, indices, gates)
    y.backward(dy)
    for t in (y, x.grad, down.grad, up.grad, gates.grad):
        assert torch.isfinite(t).all()
    assert (down.grad[12:] == 0).all() and (up.grad[12:] == 0).all()


def test_segment_none_is_the_unsplit_kernel(monkeypatch):
    """TUNING["expert"]["segment"] = None skips the segment plan and the extra programs: bitwise
    the same as one segment per expert, also under skew (it is then just not skew-robust)."""
    inputs, dy = make_inputs(13, 2, 3, 32, 12, seed=22)
    skewed(inputs[3], 2, 0.8, seed=23)
    for a, b in zip(grads(inputs, dy, None, monkeypatch), grads(inputs, dy, 1 << 20, monkeypatch)):
        assert torch.equal(a, b)


def test_uniform_routing_skips_the_segment_plan(monkeypatch):
    """No expert above the segment size -> the plan is never built (the plain kernel runs);
    one hot expert -> it is."""
    calls = []
    real = mixing._segment_plan

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(mixing, "_segment_plan", counting)
    inputs, dy = make_inputs(6, 1, 2, 16, 16, seed=24)
    inputs[3].copy_(torch.randperm(16)[:12].view(6, 1, 2))  # every expert at most once
    grads(inputs, dy, 4, monkeypatch)
    assert calls == []
    skewed(inputs[3], 1, 0.9, seed=25)
    grads(inputs, dy, 4, monkeypatch)
    assert calls == [1]


def test_lagged_split_check_answers_from_the_previous_call():
    """lagged: the first call of a key is exact (one sync), later calls answer from the count of
    the call before; keys (experts, segment) do not mix."""
    check = mixing.LaggedSplitCheck()
    uniform = torch.arange(0, 65)  # offsets of 64 experts owning one selection each
    hot = torch.tensor([0, 10] + list(range(11, 74)))  # expert 0 owns 10
    ask = [check(o, 4, lagged=True) for o in (uniform, hot, hot, uniform, uniform)]
    assert ask == [False, False, True, True, False]
    assert check(hot, 4, lagged=True) is False  # answers from the uniform call before
    assert check(hot, 20, lagged=True) is False  # a new key: exact (10 <= 20)
    assert check(hot, 8, lagged=True) is True  # another new key: exact (10 > 8)
    assert check(hot, 4, lagged=False) is True  # unlagged: always exact


def test_stale_split_decisions_keep_the_gradients_exact(monkeypatch):
    """A router turning skewed is served one call by the unsplit kernel and then by the split one
    (and back): the gradients match the float64 reference in every call, and the plan is built
    exactly in the calls whose decision (the previous call's count) said split."""
    check = mixing.LaggedSplitCheck()
    monkeypatch.setattr(mixing, "_needs_split", lambda offsets, seg: check(offsets, seg, lagged=True))
    monkeypatch.setattr(mixing, "TUNING", tuning(4))
    calls = []
    real = mixing._segment_plan
    monkeypatch.setattr(mixing, "_segment_plan", lambda *a: calls.append(1) or real(*a))
    built = []
    for step, hot in enumerate((False, True, True, False)):
        inputs, dy = make_inputs(12, 2, 3, 32, 20, seed=26 + step)  # fresh leaves: no grad accumulates
        if hot:
            skewed(inputs[3], 3, 0.9, seed=30 + step)
        else:  # 72 selections over 20 experts, at most 4 each: no list above a segment
            inputs[3].copy_((torch.arange(72) % 20)[torch.randperm(72)].view(12, 2, 3))
        calls.clear()
        check_against_float64(inputs, dy, "gelu", tol=1e-5)
        built.append(len(calls) > 0)
    assert built == [False, False, True, True]


def touched_tuning(segment):
    """The touched-only expert pass (TUNING["expert"]["touched_below"]): on for any T*S < 1e9 * N."""
    t = tuning(segment)
    t["expert"]["touched_below"] = 1e9
    return t


@pytest.mark.parametrize("skew", [False, True])
def test_touched_only_pass_matches_float64_and_the_per_expert_pass_bitwise(skew, monkeypatch):
    """Fewer selections than experts (T*S = 30 over 64, so most experts untouched; with skew, hot
    experts split into segments too): every output against float64, and bitwise equal to the
    one-program-per-expert pass (the same sums in the same order; untouched rows exactly zero, with
    every uninitialised buffer poisoned: the pass must not leave a row to an empty buffer)."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mixing, "_new_buffer", poisoned)
    inputs, dy = make_inputs(5, 2, 3, 32, 64, seed=40)
    if skew:
        skewed(inputs[3], 2, 0.8, seed=41)
    monkeypatch.setattr(mixing, "TUNING", touched_tuning(4))
    check_against_float64(inputs, dy, "gelu", tol=1e-5)
    touched = grads_with(inputs, dy, monkeypatch, touched_tuning(4))
    whole = grads_with(inputs, dy, monkeypatch, tuning(4))
    for a, b in zip(touched, whole):
        assert torch.equal(a, b)
    used = torch.bincount(inputs[3].reshape(-1).cpu(), minlength=64) > 0
    assert (~used).sum() > 20 and (touched[2][~used] == 0).all() and (touched[3][~used] == 0).all()


def test_touched_only_pass_launches_one_program_per_selection_not_per_expert(monkeypatch):
    """The grid: T*S direct programs (+ extra segments) instead of N, and only below the ratio."""
    grids = []
    real = mixing._mix_bwd_segment_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid[0])
            return real[grid]

    monkeypatch.setattr(mixing, "_mix_bwd_segment_kernel", Spy())
    inputs, dy = make_inputs(4, 1, 2, 16, 50, seed=42)
    inputs[3].copy_(torch.randperm(50)[:8].view(4, 1, 2))  # 8 distinct experts: no list splits
    t = touched_tuning(4)
    t["expert"]["touched_below"] = 0.5  # 8 < 0.5 * 50: on
    grads_with(inputs, dy, monkeypatch, t)
    t["expert"]["touched_below"] = 0.1  # 8 >= 0.1 * 50: off, one program per expert
    grads_with(inputs, dy, monkeypatch, t)
    assert grids == [8, 50]
