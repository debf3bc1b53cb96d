"""The "packed" Triton retrieval forward (triton_packed.py) under TRITON_INTERPRET=1 without a GPU:
indices equal the float64 brute force (same order), scores and indices bit-equal to "threshold",
"merge" and "onepass", the exact int64 rounds taken where the 32-bit keys are ambiguous (constructed
near-ties and exact ties, and the flag that says so), the CAP overflow fallback, and an
ahead-of-time sm_90 compile of the kernel."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tests.ops.retrieval_inputs import (  # noqa: E402
    DEVICE,
    cap_overflow_inputs,
    check_brute_force,
    one_hot_half0,
    retrieval_inputs,
    same_result,
)
from torchpeer.ops import RetrievalKernelConfig, product_key_topk_reference  # noqa: E402
from torchpeer.ops.retrieval import triton_onepass, triton_op, triton_packed  # noqa: E402
from torchpeer.ops.retrieval.triton_op import product_key_topk_triton  # noqa: E402

PACKED = RetrievalKernelConfig(forward="packed")


# "onepass" is bit-equal to "threshold" and "merge" (test_retrieval_onepass.py); one comparison each here
@pytest.mark.parametrize(
    "T,H,S,n,d_key,top_k,dtype,others",
    [
        (24, 2, 1, 32, 16, 5, torch.float32, ("merge",)),  # 6 items over 3 programs; n % BLOCK_N == 0
        (17, 3, 3, 24, 16, 6, torch.bfloat16, ("threshold",)),  # per-head keys, ragged rows, n % BLOCK_N != 0
        (3, 1, 1, 40, 8, 32, torch.float32, ("onepass",)),  # top_k 32: KP 32, 119 rank pairs
        (10, 2, 1, 3, 4, 3, torch.float32, ("threshold",)),  # n < padded top_k: fewer than k + 1 candidates
    ],
)
def test_packed_matches_float64_and_the_other_forwards(T, H, S, n, d_key, top_k, dtype, others):
    q, keys = retrieval_inputs(T, H, S, n, d_key, dtype, seed=5)
    got = product_key_topk_triton(q, keys, top_k, PACKED)
    check_brute_force(q, keys, top_k, got, 1e-5)
    for other in others:
        assert same_result(got, product_key_topk_triton(q, keys, top_k, RetrievalKernelConfig(forward=other))), other


def test_near_ties_take_the_exact_rounds():
    # half 0 of row 0: sub-keys 3 and 7 score 10 and 10 * (1 + 2**-20) (the same truncated key with
    # CAP 16's 4 slot bits, the larger one at the larger column, where the packed order picks the
    # smaller column): the packed rounds are ambiguous, the int64 rounds give the exact order
    n = 32
    scores = torch.linspace(-3.0, 3.0, n)
    scores[3], scores[7] = 10.0, 10.0 * (1 + 2**-20)
    q, keys = one_hot_half0(n, scores)
    s, i, flags = triton_packed.launch_packed(q, keys, 4, PACKED, return_flags=True)
    assert flags.tolist() == [4]  # one ambiguous half, no overflow
    assert (i[:, 0, 0] // n == 7).all() and (i[:, 0, 1] // n == 3).all()
    assert same_result((s, i), triton_op.forward(q, keys, 4, RetrievalKernelConfig(forward="threshold")))
    # the same inputs without the near-tie: the packed rounds decide alone
    keys[0, 0, 7, 0] = 9.0
    flags = triton_packed.launch_packed(q, keys, 4, PACKED, return_flags=True)[2]
    assert flags.tolist() == [0]


def test_repeated_rows_exact_ties_and_overflow():
    # every sub-key row 4 times: exact score ties (ambiguous packed rounds, index order decides); one
    # head (the interpreter's cost is per head; several: the other tests)
    q, keys = retrieval_inputs(7, 1, 1, 40, 8, torch.bfloat16, seed=2)
    keys = keys[:, :, torch.arange(40) // 4 * 4].contiguous()
    s, i, flags = triton_packed.launch_packed(q, keys, 5, PACKED, return_flags=True)
    assert (flags >= 4).all()
    assert same_result((s, i), triton_op.forward(q, keys, 5, RetrievalKernelConfig(forward="onepass")))
    # more candidates than CAP in half 0: the running top-KP fallback (flag bit 1), still exact
    cap = triton_onepass.onepass_launch(2, True, PACKED)["CAP"]
    q, keys, n = cap_overflow_inputs(cap)
    s, i, flags = triton_packed.launch_packed(q, keys, 2, PACKED, return_flags=True)
    assert flags.tolist()[0] % 4 == 1
    assert (i[..., 0] // n == n - 1).all()
    assert same_result((s, i), triton_op.forward(q, keys, 2, RetrievalKernelConfig(forward="threshold")))


def test_gradients_and_auto_never_picks_packed(monkeypatch):
    q, keys = retrieval_inputs(9, 2, 1, 32, 16, torch.float32, seed=3)
    q, keys = q.requires_grad_(), keys.requires_grad_()
    s, _ = product_key_topk_triton(q, keys, 4, PACKED)
    q64, k64 = q.detach().double().requires_grad_(), keys.detach().double().requires_grad_()
    ref_s, _ = product_key_topk_reference(q64, k64, 4)
    up = torch.randn(s.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (s * up).sum().backward()
    (ref_s * up.double()).sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys.grad.double(), k64.grad, rtol=1e-5, atol=1e-5)
    assert triton_op.forward_impl(q, keys, 4, RetrievalKernelConfig()) != "packed"
    e = product_key_topk_triton(q[:0].detach(), keys.detach(), 4, PACKED)
    assert e[0].shape == (0, 2, 4)


# The sm_90 compile of this kernel (aligned, at the bf16 top_k 16 launch) is in tests/ops/sm90_aot.py's
# list, which tests/ops/test_sm90_aot.py runs.
