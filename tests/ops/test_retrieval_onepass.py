"""The "onepass" Triton retrieval forward (triton_onepass.py) under TRITON_INTERPRET=1 without a GPU:
indices equal the float64 brute force over all n*n keys (same order, so the same sets), scores and
indices bit-equal to the "threshold" and "merge" forwards (same packed (score, -index) order), the
in-kernel fallback for rows with more than CAP candidates (ties), gradients against float64, and
an ahead-of-time sm_90 compile of the kernel (what the interpreter cannot check)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tests.ops.retrieval_inputs import DEVICE, cap_overflow_inputs, retrieval_inputs  # noqa: E402
from tests.ops.sm90_aot import run_without_interpreter  # noqa: E402
from torchpeer.ops import RetrievalKernelConfig, product_key_topk_reference  # noqa: E402
from torchpeer.ops.retrieval import triton_onepass, triton_op  # noqa: E402
from torchpeer.ops.retrieval.triton_op import product_key_topk_triton  # noqa: E402

ONEPASS = RetrievalKernelConfig(forward="onepass")


CASES = [
    # T, H, S, n, d_key, top_k, dtype (interpreter tiles: BLOCK_M 16, BLOCK_N 16, CAP 16, 3 programs)
    (40, 2, 1, 40, 16, 5, torch.float32),  # 6 work items over 3 persistent programs; ragged last tile
    (17, 3, 3, 32, 32, 8, torch.bfloat16),  # per-head keys, ragged row block
    (9, 2, 1, 24, 8, 3, torch.float16),  # top_k not a power of two, half width 4 (padded to 16)
    (6, 2, 1, 32, 8, 16, torch.float32),  # top_k 16 (CAP 16 here: every item takes the fallback)
    (4, 1, 1, 40, 8, 32, torch.float32),  # top_k 32: KP 32, 119 rank pairs (NCP 128)
    (12, 2, 1, 5, 8, 1, torch.float32),  # top_k 1, n < BLOCK_N and not a power of two
    (10, 2, 1, 3, 4, 3, torch.float32),  # n < padded top_k (4)
]


@pytest.mark.parametrize("T,H,S,n,d_key,top_k,dtype", CASES)
def test_onepass_matches_float64_brute_force(T, H, S, n, d_key, top_k, dtype):
    q, keys = retrieval_inputs(T, H, S, n, d_key, dtype)
    q, keys = q.requires_grad_(), keys.requires_grad_()
    scores, idx = product_key_topk_triton(q, keys, top_k, ONEPASS)
    q64, k64 = q.detach().double().requires_grad_(), keys.detach().double().requires_grad_()
    ref_s, ref_i = product_key_topk_reference(q64, k64, top_k)
    assert scores.shape == idx.shape == (T, H, top_k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx.cpu(), ref_i.cpu())  # same order
    assert all(set(a) == set(b) for a, b in zip(idx.reshape(-1, top_k).tolist(), ref_i.reshape(-1, top_k).tolist()))
    torch.testing.assert_close(scores.double(), ref_s, rtol=1e-5, atol=1e-5)
    assert (scores[..., :-1] >= scores[..., 1:]).all()
    # gradients through the default backward, against float64 autograd
    up = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (scores * up).sum().backward()
    (ref_s * up.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(keys.grad.double(), k64.grad, rtol=tol, atol=tol)


# Both other forwards on the per-head case; one each on the others (the "merge" kernel costs the most
# under the interpreter): "merge" on the bf16 case's random keys is the per-head case's comparison,
# "threshold" on ties is test_overflow_of_one_half_is_exact's (tied sub-keys, one half falling back)
@pytest.mark.parametrize(
    "T,H,S,n,d_key,top_k,dtype,dup,others",
    [
        (20, 2, 1, 48, 16, 6, torch.bfloat16, 1, ("threshold",)),
        (11, 2, 2, 32, 8, 4, torch.float32, 1, ("threshold", "merge")),  # per-head keys
        (7, 2, 1, 40, 8, 5, torch.float32, 4, ("merge",)),  # every sub-key row 4 times: ties, fallback
    ],
)
def test_onepass_is_bit_equal_to_threshold_and_merge(T, H, S, n, d_key, top_k, dtype, dup, others):
    q, keys = retrieval_inputs(T, H, S, n, d_key, dtype, seed=2)
    keys = keys[:, :, torch.arange(n) // dup * dup].contiguous()
    got = product_key_topk_triton(q, keys, top_k, ONEPASS)
    for other in others:
        want = product_key_topk_triton(q, keys, top_k, RetrievalKernelConfig(forward=other))
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), other


def test_prefix_by_dot_equals_cumsum():
    q, keys = retrieval_inputs(21, 2, 1, 48, 16, torch.float32, seed=3)
    a = product_key_topk_triton(q, keys, 7, ONEPASS)
    b = product_key_topk_triton(q, keys, 7, RetrievalKernelConfig(forward="onepass", onepass_prefix="dot"))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_repeated_key_rows_take_the_fallback_and_stay_exact():
    # two distinct sub-key rows per half, each repeated CAP + 8 times: the row maximum alone has
    # CAP + 8 exact ties >= theta, so every work item redoes both halves by the running top-KP
    # (sized from the CAP in force: 16 under the interpreter, the config's on a GPU); one head (the
    # kernels' cost under the interpreter is per head; several heads: the other tests)
    cap = triton_onepass.onepass_launch(5, True, ONEPASS)["CAP"]
    dup = cap + 8
    q, keys = retrieval_inputs(9, 1, 1, 2 * dup, 8, torch.float32, seed=6)
    keys = keys[:, :, torch.arange(2 * dup) // dup * dup].contiguous()
    scores, idx, flags = triton_onepass.launch_onepass(q, keys, 5, ONEPASS, return_flags=True)
    assert (flags == 2).all()
    want = triton_op.forward(q, keys, 5, RetrievalKernelConfig(forward="merge"))
    assert torch.equal(idx, want[1]) and torch.equal(scores, want[0])
    ref_s, _ = product_key_topk_reference(q.double(), keys.double(), 5)
    torch.testing.assert_close(scores.double(), ref_s, rtol=1e-5, atol=1e-5)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts


def test_overflow_of_one_half_is_exact():
    # half 0: columns 0..CAP+8 tie at score 1, column n-1 scores 2, the rest -5: theta = 1 keeps
    # CAP + 10 candidates; without the fallback column n-1 (beyond the first CAP) would be lost.
    # Half 1 is random: only its half 0 falls back (flag 1).
    q, keys, n = cap_overflow_inputs(triton_onepass.onepass_launch(2, True, ONEPASS)["CAP"])
    scores, idx, flags = triton_onepass.launch_onepass(q, keys, 2, ONEPASS, return_flags=True)
    assert flags.tolist() == [1]
    assert (idx[..., 0] // n == n - 1).all()
    want = triton_op.forward(q, keys, 2, RetrievalKernelConfig(forward="threshold"))
    assert torch.equal(idx, want[1]) and torch.equal(scores, want[0])


def test_strided_queries_and_empty_input():
    q, keys = retrieval_inputs(13, 2, 1, 24, 8, torch.float32, seed=4)
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)  # heads-major storage
    assert not q_strided.is_contiguous()
    a = product_key_topk_triton(q_strided, keys, 4, ONEPASS)
    b = product_key_topk_triton(q, keys, 4, ONEPASS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    s, i = product_key_topk_triton(q[:0], keys, 4, ONEPASS)
    assert s.shape == i.shape == (0, 2, 4)


def test_config_names_and_auto_never_picks_onepass(monkeypatch):
    with pytest.raises(ValueError, match="onepass_prefix must be one of"):
        RetrievalKernelConfig(onepass_prefix="nope")
    calls = []
    for name in ("launch_split", "launch_merge", "launch_threshold", "launch_onepass"):
        monkeypatch.setattr(triton_op, name, lambda *a, name=name: calls.append(name[7:]))
    q, keys = retrieval_inputs(80, 1, 1, 32, 8, torch.bfloat16)
    triton_op.forward(q, keys, 4, RetrievalKernelConfig())  # auto: unmeasured "onepass" is not its choice
    triton_op.forward(q, keys, 4, ONEPASS)
    assert calls == ["threshold", "onepass"]


_AOT = """
from tests.ops.sm90_aot import aot
from torchpeer.ops.retrieval import RetrievalKernelConfig, triton_onepass as op
cfg = RetrievalKernelConfig()
for xdt, (bm, _, warps, cap, _), kp, ncp, prefix_dot in [("bf16", cfg.onepass_half, 16, 64, False),
                                                       ("bf16", cfg.onepass_wide, 32, 128, True)]:
    types = {"q_ptr": "*" + xdt, "k_ptr": "*" + xdt, "pi_ptr": "*i32", "pj_ptr": "*i32", "scores_ptr": "*fp32",
             "idx_ptr": "*i64", "scr_s_ptr": "*fp32", "scr_i_ptr": "*i32", "flag_ptr": "*i32"}
    consts = dict(PER_HEAD=False, DH=64, BLOCK_M=bm, BLOCK_N=64, BLOCK_D=64, KP=kp, CAP=cap, NCP=ncp,
                  FB_BLOCK_N=64, DOT_FP32=xdt == "fp32", PREFIX_DOT=prefix_dot)
    aot(op._onepass_kernel, types, consts, num_warps=warps, say=False)
    print("ok", xdt, bm, kp, flush=True)
"""


def test_onepass_kernel_compiles_for_sm90():
    """The real compiler (not the interpreter) accepts the kernel for an H100/H200 at the config's launch
    shapes for bf16 top_k 16 and top_k 32 (the latter with the dot prefix); TRITON_INTERPRET unset, a
    subprocess."""
    out = run_without_interpreter("-c", _AOT)
    assert out.count("ok ") == 2
