"""The fused "ema" query norm (torchpeer/ops/query_norm) against the float64 reference: values, the
running-statistics update and the gradients (x, weight, bias), in every mode; equality with the
module's reference path over several steps; causality; torch.compile without graph breaks.
Triton runs in its interpreter without a GPU (TRITON_INTERPRET=1, tiny sizes)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from torchpeer.layers.query_norm import EMAQueryNorm  # noqa: E402
from torchpeer.ops.query_norm import ema_norm_reference  # noqa: E402
from torchpeer.ops.query_norm.triton_op import ema_norm_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS, MOM = 1e-5, 0.05


def _state(F, dtype, seed, n=3):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(F, generator=g) * 0.5 + 1, torch.randn(F, generator=g)
    rm, rv = torch.randn(F, generator=g), torch.rand(F, generator=g) + 0.5
    return [t.to(DEVICE, dtype) for t in (w, b, rm, rv)] + [torch.tensor(n, device=DEVICE)]


def _x(T, F, dtype, seed, scale=2.0, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, F, generator=g) * scale + shift).to(DEVICE, dtype)


def _double(state):
    return [t.double() if t.is_floating_point() else t for t in state]


def _run(fn, x, state, training, bn_grad, need_x=True, seed=1):
    """-> y, (running_mean, running_var, num_updates) after, grads of (x, weight, bias)."""
    w, b, rm, rv, n = (t.clone() for t in state)
    x, w, b = x.clone().requires_grad_(need_x), w.requires_grad_(), b.requires_grad_()
    y = fn(x, w, b, rm, rv, n, EPS, MOM, training, bn_grad)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, torch.float64)
    (y.double() * up).sum().backward()
    return y, (rm, rv, n), (x.grad, w.grad, b.grad)


CASES = [
    # T, F, x dtype, parameter/buffer dtype
    (37, 24, torch.float32, torch.float32),  # 3 splits of 16 rows: ragged tiles, ragged feature block
    (100, 16, torch.float32, torch.float32),  # several tiles per split (Chan's merge across tiles)
    (5, 40, torch.float32, torch.float32),  # T < one split: empty splits in the combination
    (2, 8, torch.float32, torch.float32),  # the smallest batch that updates the statistics
    (1, 8, torch.float32, torch.float32),  # T = 1: no update, plain gradient even in training
    (33, 24, torch.bfloat16, torch.float32),  # bf16 queries, fp32 statistics (the autocast case)
    (33, 24, torch.bfloat16, torch.bfloat16),  # a module cast to bf16: bf16 buffers, fp32 arithmetic
]
MODES = [(True, True), (True, False), (False, True)]  # (training, bn_grad)


@pytest.mark.parametrize("training,bn_grad", MODES)
@pytest.mark.parametrize("T,F,xdt,pdt", CASES)
def test_matches_float64_reference(T, F, xdt, pdt, training, bn_grad):
    x, state = _x(T, F, xdt, seed=T), _state(F, pdt, seed=F)
    y, stats, grads = _run(ema_norm_triton, x, state, training, bn_grad)
    y64, stats64, grads64 = _run(ema_norm_reference, x.double(), _double(state), training, bn_grad)
    assert y.dtype == xdt and y.shape == x.shape
    tol = 1e-5 if xdt == pdt == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    rm, rv, n = stats
    assert int(n) == int(stats64[2]) == 3 + (training and T > 1)
    torch.testing.assert_close(rm.double(), stats64[0], rtol=tol, atol=tol)
    torch.testing.assert_close(rv.double(), stats64[1], rtol=tol, atol=tol)
    for got, want, leaf in zip(grads, grads64, (x, *state[:2])):
        assert got.dtype == leaf.dtype
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("training", [True, False])
def test_parameter_gradients_without_a_query_gradient(training):
    """x without requires_grad (the BN path's reduce without its dx kernel): dweight, dbias as the reference."""
    x, state = _x(37, 24, torch.float32, seed=0), _state(24, torch.float32, seed=1)
    _, _, (gx, gw, gb) = _run(ema_norm_triton, x, state, training, True, need_x=False)
    _, _, (_, gw64, gb64) = _run(ema_norm_reference, x.double(), _double(state), training, True, need_x=False)
    assert gx is None
    torch.testing.assert_close(gw.double(), gw64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gb.double(), gb64, rtol=1e-5, atol=1e-4)


def test_batch_variance_is_exact_far_from_the_running_mean():
    """The statistics are merged from per-tile means and squared deviations, not sums of squares:
    a batch with mean 300 and std 1 against running mean 0 keeps its variance to fp32 precision."""
    x, state = _x(90, 16, torch.float32, seed=2, scale=1.0, shift=300.0), _state(16, torch.float32, seed=3, n=0)
    state[2].zero_()
    _, (rm, rv, _), _ = _run(ema_norm_triton, x, state, True, True)
    x64 = x.double()
    torch.testing.assert_close(rm.double(), x64.mean(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(rv.double(), x64.var(0), rtol=1e-4, atol=0)  # first update: rate 1


def _modules(backend_b, **opts):
    torch.manual_seed(0)
    a = EMAQueryNorm(3, 8, backend="torch", **opts).to(DEVICE)
    b = EMAQueryNorm(3, 8, backend=backend_b, **opts).to(DEVICE)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for m in (a, b):
            m.weight.copy_(torch.linspace(0.5, 1.5, 24))
            m.bias.copy_(torch.linspace(-1, 1, 24))
    return a, b


@pytest.mark.parametrize("autocast", [False, True])
def test_module_equals_the_reference_path_over_steps(autocast):
    """EMAQueryNorm(backend="triton") and the module's CPU/reference path: same values, same running
    statistics and gradients over several training steps (statistics moving), then in eval mode."""
    a, b = _modules("triton", momentum=0.3)
    assert b.uses_kernels(torch.zeros(4, 24, device=DEVICE)) and not a.uses_kernels(torch.zeros(4, 24, device=DEVICE))
    tol = 2e-2 if autocast else 1e-5
    for step in range(4):
        q = (torch.randn(20, 3, 8, generator=torch.Generator().manual_seed(step)) * 3 + step).to(DEVICE)
        if autocast:
            q = q.to(torch.bfloat16)
        up = torch.randn(q.shape, generator=torch.Generator().manual_seed(10 + step)).to(DEVICE)
        outs = []
        for m in (a, b):
            m.train(step < 3)
            qq = q.clone().requires_grad_()
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                y = m(qq)
            (y.float() * up).sum().backward()  # fixed upstream: 1-ulp bf16 differences of y stay out
            outs.append((y, qq.grad))
        torch.testing.assert_close(outs[1][0].float(), outs[0][0].float(), rtol=tol, atol=tol)
        # two fp32 computations of a cancelling BatchNorm gradient (each within 1e-5 of float64, above)
        gtol = 2e-2 if autocast else 5e-5
        torch.testing.assert_close(outs[1][1].float(), outs[0][1].float(), rtol=gtol, atol=gtol)
        for name in ("weight", "bias"):
            ga, gb = getattr(a, name).grad, getattr(b, name).grad
            torch.testing.assert_close(gb, ga, rtol=tol, atol=tol * max(1.0, ga.abs().max().item()))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-5, atol=1e-5)
    assert int(b.num_updates) == 3


def test_causal_in_train_mode():
    _, m = _modules("triton")
    m2 = EMAQueryNorm(3, 8, backend="triton").to(DEVICE)
    m2.load_state_dict(m.state_dict())
    q1 = torch.randn(30, 3, 8, device=DEVICE)
    q2 = q1.clone()
    q2[18:] = torch.randn(12, 3, 8, device=DEVICE) * 5 - 3
    assert torch.equal(m.train()(q1)[:18], m2.train()(q2)[:18])
    assert not torch.equal(m.running_mean, m2.running_mean)  # the batches differed


def test_compiles_without_graph_breaks_and_matches_eager():
    """fullgraph torch.compile: the custom ops (the functional forward/backward and the mutating
    statistics update) trace without a break; running statistics move as in eager mode."""
    eager, compiled = _modules("triton")
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    for step in range(2):
        q = (torch.randn(18, 3, 8, generator=torch.Generator().manual_seed(step)) + 1).to(DEVICE)
        qa, qb = q.clone().requires_grad_(), q.clone().requires_grad_()
        ya, yb = eager(qa), fn(qb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(qb.grad, qa.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled.running_var, eager.running_var)
    assert int(compiled.num_updates) == int(eager.num_updates) == 2


def test_float64_module_takes_the_reference_path():
    m = EMAQueryNorm(3, 8, backend="triton").double()
    assert not m.uses_kernels(torch.zeros(4, 24, dtype=torch.float64, device=DEVICE))


def _fused(monkeypatch, fused):
    from torchpeer.ops.query_norm import triton_op

    monkeypatch.setattr(triton_op, "FUSED_UPDATE", fused)
    return triton_op


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bn_grad", [True, False])
def test_running_statistics_follow_the_reference_over_steps(monkeypatch, fused, bn_grad):
    """Five training steps from num_updates = 0 with momentum 0.3: the rate goes 1, 1/2, 1/3, then
    the momentum (steps 4 and 5); after each step the value, the gradients (x, weight, bias), the running mean and
    variance and num_updates equal the float64 reference's; then an eval step leaves them alone.
    Both update paths: in the forward kernel (FUSED_UPDATE, the default) and the separate kernel."""
    triton_op = _fused(monkeypatch, fused)
    F, mom = 40, 0.3  # 3 feature blocks of 16 in the interpreter, the last one ragged
    state = _state(F, torch.float32, seed=5, n=0)
    state64 = [t.clone() for t in _double(state)]  # a num_updates of its own
    for step in range(6):
        training = step < 5
        x = _x(23 + 7 * step, F, torch.float32, seed=100 + step, scale=1.0 + step, shift=step - 3.0)
        outs = []
        for fn, st, xx in ((triton_op.ema_norm_triton, state, x), (ema_norm_reference, state64, x.double())):
            w, b = (t.clone().requires_grad_() for t in st[:2])
            xx = xx.clone().requires_grad_()
            y = fn(xx, w, b, st[2], st[3], st[4], EPS, mom, training, bn_grad)
            up = torch.randn(y.shape, generator=torch.Generator().manual_seed(step)).to(y.device, torch.float64)
            (y.double() * up).sum().backward()
            outs.append((y, xx.grad, w.grad, b.grad))
        for got, want in zip(outs[0], outs[1]):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))
        torch.testing.assert_close(state[2].double(), state64[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state[3].double(), state64[3], rtol=1e-5, atol=1e-5)
        assert int(state[4]) == int(state64[4]) == min(step + 1, 5)
    if fused:  # the arrival counters are zero again after every launch
        assert not triton_op._SYNC[x.device].any()


def test_fused_and_separate_update_agree(monkeypatch):
    """The in-kernel update and the separate update kernel combine the same partials with the same
    code: same value, statistics and gradients (to rounding: two compiled kernels)."""
    x, state = _x(61, 70, torch.bfloat16, seed=7), _state(70, torch.float32, seed=8)
    results = []
    for fused in (True, False):
        _fused(monkeypatch, fused)
        y, stats, grads = _run(ema_norm_triton, x, state, True, True)
        results.append((y.float(), *stats, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_many_programs_update_the_statistics_once():
    """Enough feature blocks and splits that many programs arrive at the counters (on a GPU: the
    production grid, 4096 x 1024, programs running concurrently): three steps against float64."""
    T, F = (4096, 1024) if DEVICE == "cuda" else (150, 100)
    state = _state(F, torch.float32, seed=9, n=1)
    state64 = [t.clone() for t in _double(state)]
    for step in range(3):
        x = _x(T, F, torch.float32, seed=200 + step, scale=1.5, shift=0.5 * step)
        y = ema_norm_triton(x, *state, EPS, MOM, True)
        y64 = ema_norm_reference(x.double(), *state64, EPS, MOM, True)
        torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state[2].double(), state64[2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state[3].double(), state64[3], rtol=1e-5, atol=1e-5)
        assert int(state[4]) == int(state64[4]) == 2 + step


AOT_SCRIPT = """
from tests.ops.sm90_aot import aot
from torchpeer.ops.query_norm import triton_kernels as qn

for xdt in ("bf16", "fp32"):
    types = {"x_ptr": "*" + xdt, "y_ptr": "*" + xdt, "n_ptr": "*i64", "sync_ptr": "*i32"}
    types.update(eps="fp32", momentum="fp32")
    types.update({a + "_ptr": "*fp32" for a in ("w", "b", "rm", "rv", "aux")})
    consts = {"P_PAD": 64, "BLOCK_T": 64, "BLOCK_F": 64}
    ptx = aot(qn._fwd_update_kernel, types, consts, say=False).asm["ptx"]
    print("ok", xdt, ptx.count("atom.global.gpu.acq_rel.add"))
"""


def test_fused_update_kernel_compiles_for_sm90():
    """The in-kernel update compiles for sm_90 without a GPU (tests/ops/sm90_aot.py covers the other
    kernels), with its two arrivals as acq_rel atomics at GPU scope (the ordering the last-program
    pattern relies on)."""
    from tests.ops.sm90_aot import run_without_interpreter

    out = run_without_interpreter("-c", AOT_SCRIPT)
    assert out.split() == ["ok", "bf16", "2", "ok", "fp32", "2"], out
