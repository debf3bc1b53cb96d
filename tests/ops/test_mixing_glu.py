"""The GLU read-out's mixing (``expert_mix(..., lin=w)``: sum g act(x.u) (x.w) v) and the linear one
(activation "identity": sum g (x.u) v) on every backend against the float64 loop formula, forward
and all gradients; the GLU Triton kernels (triton_glu_*.py) under skew (split segments and the
reduce pass), in mixed precision, bitwise deterministic, through opcheck, and their input errors.
Without a GPU the kernels run in Triton's CPU interpreter: tiny sizes."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from tests.references import naive_float64, rel_err  # noqa: E402
from torchpeer.ops import expert_mix  # noqa: E402
from torchpeer.ops.expert_mixing import triton_glu_op as glu  # noqa: E402
from torchpeer.ops.expert_mixing import triton_op as mixing  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"tile": 128, "num_warps": {1024: 4}}  # BLOCK_D <= 64 -> BLOCK_S >= 2: many loop iterations


def make_inputs(T, H, K, d, N, dtype=torch.float32, table_dtype=None, seed=0, skew=0.0):
    """Leaf inputs x, down, up, lin, gates (requires_grad), indices, dy. skew: the fraction of
    selections sent to experts 0 and 1 (hot expert lists)."""
    gen = torch.Generator().manual_seed(seed)
    table_dtype = table_dtype or dtype
    x = torch.randn(T, d, generator=gen)
    down, lin = (torch.randn(N, d, generator=gen) / d**0.25 for _ in range(2))  # dots of order 1
    up = torch.randn(N, d, generator=gen)
    idx = torch.randint(0, N, (T, H, K), generator=gen)
    hot = torch.rand(T, H, K, generator=gen) < skew
    idx = torch.where(hot, torch.randint(0, 2, (T, H, K), generator=gen), idx)
    gates = torch.rand(T, H, K, generator=gen) + 0.1
    dy = torch.randn(T, d, generator=gen).to(DEVICE, dtype)
    leaves = [x.to(DEVICE, dtype)] + [t.to(DEVICE, table_dtype) for t in (down, up, lin)] + [gates.to(DEVICE)]
    return [t.requires_grad_() for t in leaves], idx.to(DEVICE), dy


def check(leaves, idx, dy, activation, glu_table, backend, tol):
    """Forward and every gradient of expert_mix against naive_float64; returns (y, grads)."""
    x, down, up, lin, gates = leaves
    y = expert_mix(x, down, up, idx, gates, activation, lin=lin if glu_table else None, backend=backend)
    y.backward(dy)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = naive_float64(ref[0], ref[1], ref[2], idx, ref[4], activation, lin=ref[3] if glu_table else None)
    y_ref.backward(dy.double())
    assert y.dtype == x.dtype and rel_err(y, y_ref) < tol, ("y", rel_err(y, y_ref))
    names = ("x", "down", "up", "lin", "gates")
    for name, leaf, r in zip(names, leaves, ref):
        if name == "lin" and not glu_table:
            assert leaf.grad is None
            continue
        assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
        assert leaf.grad.abs().sum() > 0, name
        assert rel_err(leaf.grad, r.grad) < tol, (name, rel_err(leaf.grad, r.grad))
    return y, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
@pytest.mark.parametrize(
    "activation,glu_table", [("gelu", True), ("relu", True), ("identity", False), ("identity", True)]
)
def test_glu_and_linear_match_the_loop_formula(backend, activation, glu_table, monkeypatch):
    # K = 5 (not a power of two), ragged T, d = 24 (masked columns), N < T*H*K (repeats)
    monkeypatch.setattr(mixing, "TUNING", {"fwd": SMALL, "expert": dict(SMALL, segment=256), "dx": SMALL})
    leaves, idx, dy = make_inputs(T=13, H=2, K=5, d=24, N=17, seed=1)
    check(leaves, idx, dy, activation, glu_table, backend, tol=1e-5)


def test_glu_kernels_under_skew_split_segments_and_reduce(monkeypatch):
    """80% of selections on experts 0 and 1 with segments of 4: hot lists are walked by several
    programs whose fp32 partials (three rows each) the reduce kernel adds; the result is the
    spec's, and bitwise the same on a second run (no atomics)."""
    monkeypatch.setattr(mixing, "TUNING", {"fwd": SMALL, "expert": dict(SMALL, segment=4), "dx": SMALL})
    leaves, idx, dy = make_inputs(T=19, H=2, K=3, d=32, N=23, skew=0.8, seed=2)
    offsets = mixing._sort_by_expert(idx, 23)[1]
    assert int((offsets[1:] - offsets[:-1]).max()) > 4 * 4  # expert 0 spans several segments
    y1, g1 = check(leaves, idx, dy, "gelu", True, "triton", tol=1e-5)
    for t in leaves:
        t.grad = None
    y2 = expert_mix(leaves[0], leaves[1], leaves[2], idx, leaves[4], "gelu", lin=leaves[3], backend="triton")
    y2.backward(dy)
    assert torch.equal(y1, y2)
    for a, t in zip(g1, leaves):
        assert torch.equal(a, t.grad)


@pytest.mark.parametrize("dtype,table_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_glu_kernels_in_mixed_precision(dtype, table_dtype):
    """bf16 activations with bf16 tables, and with fp32 master tables (rows converted in registers):
    each gradient in its input's dtype, within bf16 rounding of the float64 formula."""
    leaves, idx, dy = make_inputs(T=11, H=2, K=3, d=32, N=19, dtype=dtype, table_dtype=table_dtype, seed=3)
    check(leaves, idx, dy, "gelu", True, "triton", tol=3e-2)


def test_glu_kernels_under_autocast_and_with_no_tokens():
    leaves, idx, dy = make_inputs(T=7, H=1, K=4, d=16, N=9, seed=4)
    x, down, up, lin, gates = leaves
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = expert_mix(x, down, up, idx, gates, lin=lin, backend="triton")
    assert y.dtype == torch.bfloat16
    assert rel_err(y, naive_float64(x, down, up, idx, gates, "gelu", lin=lin)) < 3e-2
    y0 = expert_mix(x[:0], down, up, idx[:0], gates[:0], lin=lin, backend="triton")
    y0.sum().backward()
    assert y0.shape == (0, 16) and lin.grad is not None and not lin.grad.any()


def test_opcheck_glu_ops():
    """Schema, fake-tensor, autograd registration and AOT dispatch checks of both GLU custom ops."""
    leaves, idx, dy = make_inputs(T=5, H=1, K=3, d=8, N=8, seed=7)
    x, down, up, lin, gates = leaves
    torch.library.opcheck(glu._peer_glu_fwd, (x, down, lin, up, idx, gates, "gelu"))
    _, h, z = glu._peer_glu_fwd(x, down, lin, up, idx, gates, "gelu")
    args = (dy, *(t.detach() for t in (x, down, lin, up)), idx, gates.detach(), h, z, "relu")
    torch.library.opcheck(glu._peer_glu_bwd, args)


@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_bad_lin_tables_raise_clear_errors(backend):
    leaves, idx, _ = make_inputs(T=4, H=1, K=2, d=8, N=6)
    x, down, up, lin, gates = (t.detach() for t in leaves)
    with pytest.raises(ValueError, match=r"lin \(the GLU read-out's table\) must be .*\(6, 8\)"):
        expert_mix(x, down, up, idx, gates, lin=lin[:, :4], backend=backend)
    with pytest.raises(ValueError, match=r"lin \(the GLU read-out's table\) must be"):
        expert_mix(x, down, up, idx, gates, lin=lin.long(), backend=backend)
    if backend == "triton":
        with pytest.raises(TypeError, match="lin must be float16, bfloat16 or float32"):
            expert_mix(x, down, up, idx, gates, lin=lin.double(), backend=backend)


_AOT = """
from tests.ops.sm90_aot import aot
from torchpeer.ops.expert_mixing import triton_glu_kernels as g, triton_kernels as k

def ok(fn, types, consts, warps=4):
    aot(fn, types, consts, num_warps=warps, say=False)
    print("ok", fn.__name__, consts.get("ACT"), flush=True)

bf = {a: "*bf16" for a in ("x_ptr", "down_ptr", "lin_ptr", "up_ptr", "y_ptr", "dy_ptr", "ddown_ptr", "dlin_ptr",
                          "dup_ptr", "dx_ptr")}
f32 = {a: "*fp32" for a in ("gate_ptr", "h_ptr", "z_ptr", "partial_ptr", "cu_ptr", "cw_ptr", "dgate_ptr", "coef_ptr")}
i64 = {a: "*i64" for a in ("idx_ptr", "perm_ptr", "offsets_ptr", "seg_expert_ptr", "seg_index_ptr", "hot_ptr",
                           "nseg_ptr", "pbase_ptr")}
types = {**bf, **f32, **i64, "keys_ptr": "*i32"}  # keys: the sorted expert ids (int32 for N < 2^31)
ok(g._glu_fwd_kernel, types, dict(ACT=0, BLOCK_S=8, BLOCK_D=1024))
ok(g._glu_bwd_segment_kernel, types, dict(ACT=0, BLOCK_S=1, BLOCK_D=1024))
ok(g._glu_bwd_reduce_kernel, types, dict(BLOCK_D=1024))
ok(g._glu_bwd_dx_kernel, types, dict(BLOCK_S=4, BLOCK_D=1024), warps=2)
ok(k._mix_fwd_kernel, types, dict(ACT=2, BLOCK_S=8, BLOCK_D=1024))
ok(k._mix_bwd_segment_kernel, types, dict(ACT=2, BLOCK_S=1, BLOCK_D=1024, TOUCHED=False))
ok(k._mix_bwd_segment_kernel, types, dict(ACT=0, BLOCK_S=1, BLOCK_D=1024, TOUCHED=True))  # the touched-only pass
"""


def test_glu_kernels_and_the_identity_activation_compile_for_sm90():
    from tests.ops.sm90_aot import run_without_interpreter

    out = run_without_interpreter("-c", _AOT)
    assert out.count("ok ") == 7, out


def test_glu_kernels_take_int32_indices_bf16_gates_and_strided_tables():
    """int32 indices and bf16 gates give what int64 / fp32 give (up to the gates' rounding); a
    lin table that is a column slice of a wider one (row stride != d) is read in place."""
    leaves, idx, dy = make_inputs(T=9, H=2, K=3, d=16, N=11, seed=5)
    x, down, up, lin, gates = (t.detach() for t in leaves)
    wide = torch.randn(11, 40, device=DEVICE)
    wide[:, 8:24] = lin
    strided = wide[:, 8:24]
    assert strided.stride(0) == 40
    base = expert_mix(x, down, up, idx, gates, lin=lin, backend="triton")
    torch.testing.assert_close(expert_mix(x, down, up, idx.int(), gates, lin=strided, backend="triton"), base)
    g16 = gates.bfloat16()
    ref = naive_float64(x, down, up, idx, g16.float(), "gelu", lin=lin)
    assert rel_err(expert_mix(x, down, up, idx.int(), g16, lin=lin, backend="triton"), ref) < 1e-5
