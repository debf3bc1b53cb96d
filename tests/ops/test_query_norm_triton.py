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
