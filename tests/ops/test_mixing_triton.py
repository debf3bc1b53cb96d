"""Tests for the Triton expert-mixing op (torchpeer/ops/expert_mixing/triton_*.py) vs the float64 reference.

Without a GPU the kernels run in Triton's CPU interpreter, so sizes stay tiny (T <= 37, d <= 64,
N <= 64). bf16/fp16 run natively in the interpreter (no upcasting needed); note the interpreter
rounds fp32 -> bf16 by truncation (GPUs round to nearest), so bf16 errors here are ~2x a GPU's.
"""

import os

import torch

if not torch.cuda.is_available():
    # must happen before triton decorates the kernels (i.e. before triton_kernels.py is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from tests.references import rel_err  # noqa: E402
from torchpeer.ops import dispatch, expert_mix, expert_mix_reference  # noqa: E402
from torchpeer.ops.expert_mixing import triton_op as mixing  # noqa: E402
from torchpeer.ops.expert_mixing.triton_op import expert_mix_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(T, H, K, d, N, dtype=torch.float32, table_dtype=None, gate_dtype=torch.float32, seed=0):
    """Random leaf inputs (never zeros). Gates are softmax-like positive weights."""
    gen = torch.Generator().manual_seed(seed)
    table_dtype = table_dtype or dtype
    x = torch.randn(T, d, generator=gen)
    down = torch.randn(N, d, generator=gen) / d**0.25  # pre-activations of order 1: both GELU regimes
    up = torch.randn(N, d, generator=gen)
    indices = torch.randint(0, N, (T, H, K), generator=gen)
    gates = torch.rand(T, H, K, generator=gen) + 0.1
    dy = torch.randn(T, d, generator=gen)
    leaves = [
        x.to(DEVICE, dtype).requires_grad_(),
        down.to(DEVICE, table_dtype).requires_grad_(),
        up.to(DEVICE, table_dtype).requires_grad_(),
        indices.to(DEVICE),
        gates.to(DEVICE, gate_dtype).requires_grad_(),
    ]
    return leaves, dy.to(DEVICE, dtype)


def check_against_float64(inputs, dy, activation, tol):
    """Forward and the four gradients of expert_mix_triton vs expert_mix_reference in float64."""
    x, down, up, indices, gates = inputs
    y = expert_mix_triton(x, down, up, indices, gates, activation)
    y.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, down, up, gates)]
    xr, dr, ur, gr = ref_leaves
    y_ref = expert_mix_reference(xr, dr, ur, indices, gr, activation)
    y_ref.backward(dy.double())

    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.isfinite(y).all()
    assert rel_err(y, y_ref) < tol, ("y", rel_err(y, y_ref))
    for name, leaf, ref in zip(("x", "down", "up", "gates"), (x, down, up, gates), ref_leaves):
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        assert rel_err(leaf.grad, ref.grad) < tol, (name, rel_err(leaf.grad, ref.grad))


# (T, H, K, d, N, activation): ragged T, K not a power of two, H = 1, d not a power of two,
# N < T*H*K so experts repeat within and across tokens
CASES = [
    (37, 2, 3, 48, 64, "gelu"),
    (13, 1, 5, 64, 7, "relu"),
    (7, 4, 12, 40, 64, "gelu"),
    (23, 3, 1, 17, 11, "relu"),
    (11, 2, 4, 24, 9, "identity"),  # the linear read-out's
]


@pytest.mark.parametrize("T,H,K,d,N,activation", CASES)
def test_fp32_matches_float64_reference(T, H, K, d, N, activation):
    inputs, dy = make_inputs(T, H, K, d, N)
    check_against_float64(inputs, dy, activation, tol=1e-5)


# every activation in bf16; fp16 (the other 16-bit load/store type) with gelu: the activation is a
# constexpr branch on fp32 values, independent of the storage dtype
@pytest.mark.parametrize(
    "dtype,activation",
    [(torch.bfloat16, "gelu"), (torch.bfloat16, "relu"), (torch.bfloat16, "identity"), (torch.float16, "gelu")],
)
def test_half_precision_matches_float64_reference(dtype, activation):
    inputs, dy = make_inputs(19, 2, 5, 32, 29, dtype=dtype, gate_dtype=dtype, seed=1)
    # bf16 rounding of the output and of each gradient alone is ~3e-3 relative
    check_against_float64(inputs, dy, activation, tol=2e-2)


def test_small_blocks_many_loop_iterations(monkeypatch):
    """Tiles of 2 rows: every kernel loops many times, with a ragged last block (S = 15), and each
    expert (N = 7) owns ~30 selections, so the expert loop and its id prefetch run many iterations."""
    tile2 = {"tile": 128, "num_warps": {1024: 4}}  # BLOCK_D = 64 -> BLOCK_S = 2, 1 warp
    monkeypatch.setattr(mixing, "TUNING", {"fwd": tile2, "expert": tile2, "dx": tile2})
    assert mixing._launch_config("expert", 48, 15) == (64, 2, 1)
    inputs, dy = make_inputs(13, 3, 5, 48, 7, seed=9)
    check_against_float64(inputs, dy, "gelu", tol=1e-5)


def test_repeated_experts_within_a_token():
    inputs, dy = make_inputs(9, 2, 4, 24, 5, seed=2)
    indices = inputs[3]
    indices[:, :, 1] = indices[:, :, 0]  # same expert twice in one head
    indices[:, 1, :] = indices[:, 0, :]  # and in both heads
    indices[3] = 4  # one token picks expert 4 for all 8 selections
    check_against_float64(inputs, dy, "gelu", tol=1e-5)


def test_mixed_dtypes_fp32_tables_bf16_activations():
    # fp32 master tables, bf16 x, fp16 gates: every gradient comes back in its own input's dtype
    inputs, dy = make_inputs(
        11, 2, 3, 32, 16, dtype=torch.bfloat16, table_dtype=torch.float32, gate_dtype=torch.float16
    )
    check_against_float64(inputs, dy, "gelu", tol=2e-2)


def test_autocast_runs_in_autocast_dtype():
    (x, down, up, indices, gates), dy = make_inputs(10, 2, 3, 32, 16, seed=3)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = expert_mix_triton(x, down, up, indices, gates)
    assert y.dtype == torch.bfloat16
    y.float().backward(dy)
    assert x.grad.dtype == down.grad.dtype == torch.float32
    y_ref = expert_mix_reference(
        x.detach().double(), down.detach().double(), up.detach().double(), indices, gates.double()
    )
    assert rel_err(y, y_ref) < 2e-2


def test_every_output_element_is_written(monkeypatch):
    """Outputs come from uninitialised buffers: poison them with NaN and check nothing survives.

    N = 64 experts but only 16 are used, so most table-gradient rows must be written as zeros.
    """

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(mixing, "_new_buffer", poisoned)
    (x, down, up, indices, gates), dy = make_inputs(8, 2, 3, 20, 64, seed=4)
    indices.remainder_(16)
    y = expert_mix_triton(x, down, up, indices, gates)
    y.backward(dy)
    for t in (y, x.grad, down.grad, up.grad, gates.grad):
        assert torch.isfinite(t).all()
    assert (down.grad[16:] == 0).all() and (up.grad[16:] == 0).all()
    assert down.grad[:16].abs().sum() > 0 and up.grad[:16].abs().sum() > 0


def test_backward_is_bitwise_deterministic():
    grads = []
    for _ in range(2):
        (x, down, up, indices, gates), dy = make_inputs(12, 2, 3, 16, 6, seed=5)
        expert_mix_triton(x, down, up, indices, gates, deterministic=True).backward(dy)
        grads.append([t.grad.clone() for t in (x, down, up, gates)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_empty_batch():
    (x, down, up, indices, gates), _ = make_inputs(0, 2, 3, 16, 8)
    y = expert_mix_triton(x, down, up, indices, gates)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert (down.grad == 0).all() and gates.grad.shape == (0, 2, 3)


def test_torch_compile_fullgraph_no_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager traces fwd + bwd through the fake kernels."""
    (x, down, up, indices, gates), dy = make_inputs(9, 2, 3, 16, 12, seed=6)

    def f(x, down, up, indices, gates):
        return expert_mix_triton(torch.tanh(x), down, up, indices, gates * 2.0) * 3.0

    torch._dynamo.reset()
    y_c = torch.compile(f, backend="aot_eager", fullgraph=True)(x, down, up, indices, gates)
    y_c.backward(dy)
    grads_c = [t.grad.clone() for t in (x, down, up, gates)]
    for t in (x, down, up, gates):
        t.grad = None
    y_e = f(x, down, up, indices, gates)
    y_e.backward(dy)
    torch.testing.assert_close(y_c, y_e)
    for gc, t in zip(grads_c, (x, down, up, gates)):
        torch.testing.assert_close(gc, t.grad)


def test_opcheck_forward_and_backward_ops():
    """Schema, fake-tensor, autograd registration and AOT dispatch checks of both custom ops."""
    (x, down, up, indices, gates), dy = make_inputs(5, 1, 3, 8, 8, seed=7)
    torch.library.opcheck(mixing._peer_mix_fwd, (x, down, up, indices, gates, "gelu"))
    _, h = mixing._peer_mix_fwd(x, down, up, indices, gates, "gelu")
    args = (dy, x.detach(), down.detach(), up.detach(), indices, gates.detach(), h, "relu")
    torch.library.opcheck(mixing._peer_mix_bwd, args)


def _bad(**overrides):
    (x, down, up, indices, gates), _ = make_inputs(4, 2, 3, 8, 10)
    args = dict(x=x, down=down, up=up, indices=indices, gates=gates, activation="gelu")
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        (lambda a: {"x": a["x"][None]}, ValueError, "x must be"),
        (lambda a: {"down": a["down"][:, :4]}, ValueError, "down and up"),
        (lambda a: {"up": a["up"][:5]}, ValueError, "down and up"),
        (lambda a: {"indices": a["indices"][:3]}, ValueError, "indices must be"),
        (lambda a: {"indices": a["indices"][0]}, ValueError, "indices must be"),
        (lambda a: {"gates": a["gates"][:, :1]}, ValueError, "gates must have the shape"),
        (lambda a: {"indices": a["indices"].float()}, TypeError, "int32 or int64"),
        (lambda a: {"gates": a["indices"]}, TypeError, "floating-point"),
        (lambda a: {"x": a["x"].double()}, TypeError, "x must be float16"),
        (lambda a: {"activation": "silu"}, ValueError, "activation must be"),
        (lambda a: {"indices": a["indices"] + 10}, ValueError, r"indices must lie in \[0, 10\)"),
        (lambda a: {"indices": a["indices"] - 10}, ValueError, r"indices must lie in \[0, 10\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(overrides, exc, match):
    args = _bad()
    args.update(overrides(args))
    if "lie in" in match and DEVICE != "cpu":
        pytest.skip("index range is only checked for CPU tensors")
    with pytest.raises(exc, match=match):
        expert_mix_triton(**args)


def test_cpu_without_interpreter_points_to_torch_backend(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_interpreting", lambda: False)
    args = _bad()
    args = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(ValueError, match="use backend='torch'"):
        expert_mix(**args, backend="triton")


def test_int32_indices_match_int64():
    (x, down, up, indices, gates), _ = make_inputs(6, 2, 3, 16, 9, seed=8)
    y64 = expert_mix_triton(x, down, up, indices, gates)
    y32 = expert_mix_triton(x, down, up, indices.int(), gates)
    torch.testing.assert_close(y32, y64, rtol=0, atol=0)
