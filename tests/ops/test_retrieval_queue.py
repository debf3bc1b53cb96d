"""The "queue" Triton retrieval forward (triton_queue.py) under TRITON_INTERPRET=1 without a GPU: indices
equal the float64 brute force, scores and indices bit-equal to "merge", "threshold" and "onepass", and the
exact path taken (flag 4 per half) exactly where the per-row check must fail: a group holding more than D
of a row's top-k, a near tie, exact ties; CAP overflow inside the exact path (flag 1). Small sizes: the
interpreter runs one tensor-core product per selection round. Its sm_90 compile is in sm90_aot.py."""

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
from torchpeer.ops.retrieval import triton_onepass, triton_op, triton_queue  # noqa: E402
from torchpeer.ops.retrieval.triton_common import dot_fp32  # noqa: E402
from torchpeer.ops.retrieval.triton_op import product_key_topk_triton  # noqa: E402

QUEUE = RetrievalKernelConfig(forward="queue")


@pytest.mark.parametrize(
    "T,H,S,n,d_key,top_k,dtype,cfg,other",
    [
        (12, 2, 1, 32, 16, 5, torch.float32, QUEUE, "merge"),  # 4 items over 3 programs; n % BLOCK_N == 0
        (17, 3, 3, 24, 16, 6, torch.bfloat16, QUEUE, "threshold"),  # per-head keys, ragged rows, n % 16 != 0
        (16, 1, 1, 48, 8, 4, torch.float32, RetrievalKernelConfig(forward="queue", queue_depth=3), "onepass"),
        (2, 1, 1, 40, 8, 32, torch.float32, QUEUE, "onepass"),  # top_k 32: fewer than k + 1 keys per group set
    ],
)
def test_queue_matches_float64_and_the_other_forwards(T, H, S, n, d_key, top_k, dtype, cfg, other):
    q, keys = retrieval_inputs(T, H, S, n, d_key, dtype, seed=5)
    got = product_key_topk_triton(q, keys, top_k, cfg)
    check_brute_force(q, keys, top_k, got, 1e-5)
    assert same_result(got, product_key_topk_triton(q, keys, top_k, RetrievalKernelConfig(forward=other)))


@pytest.mark.parametrize("dtype,g", [(torch.float32, 0), (torch.bfloat16, 9)])
def test_a_group_holding_more_than_d_winners_takes_the_exact_path(dtype, g):
    # tiles are W wide (16 in the interpreter, the launch's BLOCK_N on a GPU), n = 4 W: group g = sub-keys
    # g, g + W, g + 2W, g + 3W; give it the 4 best half-0 scores (D = 3: the queue keeps 3, its best dropped
    # key o = 7 beats the 4th winner from another group). bf16 (a tensor-core tile): o is folded to 8
    # columns, group 9 onto 1
    k, cfg = 4, RetrievalKernelConfig(forward="queue", queue_depth=3)
    fp32 = dot_fp32(*(torch.zeros(1, 1, 2, dtype=dtype, device=DEVICE) for _ in range(2)))
    w = triton_queue.queue_launch(64, k, fp32, cfg)["BLOCK_N"]
    n = 4 * w
    # the 4 best in group g (exact path, flag 4); control: spread over groups g and g + 1 (3 + 1), the
    # queues decide alone (flag 0)
    for cols, flag in (([g, g + w, g + 2 * w, g + 3 * w], 4), ([g, g + w, g + 2 * w, g + 1], 0)):
        scores = torch.linspace(-3.0, 3.0, n)
        scores[torch.tensor(cols)] = torch.tensor([10.0, 9.0, 8.0, 7.0])
        q, keys = (x.to(dtype) for x in one_hot_half0(n, scores))
        got = triton_queue.launch_queue(q, keys, k, cfg, return_flags=True)
        assert got[2].tolist() == [flag], cols
        check_brute_force(q, keys, k, got[:2], 1e-6)


def test_near_tie_and_exact_ties():
    # sub-keys 3 and 7 (two groups) score 10 and the next float: the same truncated key (n 32 = 2 tiles of
    # 16 under the interpreter: 1 tile bit per key)
    scores = torch.linspace(-3.0, 3.0, 32)
    scores[3], scores[7] = 10.0, torch.nextafter(torch.tensor(10.0), torch.tensor(11.0))
    q, keys = one_hot_half0(32, scores)
    s, i, flags = triton_queue.launch_queue(q, keys, 4, QUEUE, return_flags=True)
    assert flags.tolist() == [4]
    assert (i[..., :2] // 32 % 4 == 3).all()  # the two near-tied sub-keys (their fp32 pair sums tie)
    assert same_result((s, i), triton_op.forward(q, keys, 4, RetrievalKernelConfig(forward="threshold")))
    scores[7] = 9.0  # control
    q, keys = one_hot_half0(32, scores)
    assert triton_queue.launch_queue(q, keys, 4, QUEUE, return_flags=True)[2].tolist() == [0]
    # every sub-key row 4 times: exact ties in every row (equal keys in two groups pop together)
    q, keys = retrieval_inputs(5, 1, 1, 32, 8, torch.bfloat16, seed=2)
    keys = keys[:, :, torch.arange(32) // 4 * 4].contiguous()
    s, i, flags = triton_queue.launch_queue(q, keys, 3, QUEUE, return_flags=True)
    assert (flags >= 4).all()
    assert same_result((s, i), triton_op.forward(q, keys, 3, RetrievalKernelConfig(forward="onepass")))


def test_exact_path_cap_overflow():
    cap = triton_onepass.onepass_launch(2, True, QUEUE)["CAP"]
    q, keys, n = cap_overflow_inputs(cap)
    s, i, flags = triton_queue.launch_queue(q, keys, 2, QUEUE, return_flags=True)
    assert flags.tolist()[0] % 4 == 1 and flags.tolist()[0] >= 4  # ties: exact path, then its fallback
    assert (i[..., 0] // n == n - 1).all()
    assert same_result((s, i), triton_op.forward(q, keys, 2, RetrievalKernelConfig(forward="threshold")))


def test_gradients_auto_and_config():
    q, keys = retrieval_inputs(9, 2, 1, 32, 16, torch.float32, seed=3)
    q, keys = q.requires_grad_(), keys.requires_grad_()
    s, _ = product_key_topk_triton(q, keys, 4, QUEUE)
    q64, k64 = q.detach().double().requires_grad_(), keys.detach().double().requires_grad_()
    ref_s, _ = product_key_topk_reference(q64, k64, 4)
    up = torch.randn(s.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (s * up).sum().backward()
    (ref_s * up.double()).sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys.grad.double(), k64.grad, rtol=1e-5, atol=1e-5)
    assert triton_op.forward_impl(q, keys, 4, RetrievalKernelConfig()) != "queue"
    assert product_key_topk_triton(q[:0].detach(), keys.detach(), 4, QUEUE)[0].shape == (0, 2, 4)
    with pytest.raises(ValueError, match="queue_depth"):
        RetrievalKernelConfig(forward="queue", queue_depth=5)
