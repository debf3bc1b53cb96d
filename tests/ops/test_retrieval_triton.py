"""Triton product-key retrieval vs the float64 reference over all n*n keys (TRITON_INTERPRET=1 without a GPU).

The main cases run the "threshold" forward (each with one of the backward implementations); "merge",
the "auto" choice, ties and the CAP-overflow fallback have their own tests. Algorithms and tuning
are picked by RetrievalKernelConfig, passed down (nothing is read from the environment).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tests.ops.retrieval_inputs import DEVICE, cap_overflow_inputs, retrieval_inputs  # noqa: E402
from torchpeer.ops import RetrievalKernelConfig, dispatch, product_key_topk, product_key_topk_reference  # noqa: E402
from torchpeer.ops.retrieval import triton_op, triton_threshold  # noqa: E402
from torchpeer.ops.retrieval.kernel_config import DEFAULT_CONFIG  # noqa: E402
from torchpeer.ops.retrieval.triton_common import next_pow2  # noqa: E402
from torchpeer.ops.retrieval.triton_op import product_key_topk_triton  # noqa: E402


def _check_against_reference(q, keys, top_k, grads=True, config=None):
    """Indices equal, scores match float64, gradients match float64 autograd."""
    q = q.detach().requires_grad_(grads)
    keys = keys.detach().requires_grad_(grads)
    scores, idx = product_key_topk_triton(q, keys, top_k, config)
    q64 = q.detach().double().requires_grad_(grads)
    k64 = keys.detach().double().requires_grad_(grads)
    ref_scores, ref_idx = product_key_topk_reference(q64, k64, top_k)

    T, H, _ = q.shape
    assert scores.shape == idx.shape == (T, H, top_k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert torch.equal(idx.cpu(), ref_idx.cpu())
    # fp32 sums of exact products (inputs are rounded to their dtype before both computations)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-5, atol=1e-5)
    assert (scores[..., :-1] >= scores[..., 1:]).all()
    if not grads:
        return
    up = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (scores * up).sum().backward()
    (ref_scores * up.double()).sum().backward()
    assert q.grad.dtype == q.dtype and keys.grad.dtype == keys.dtype
    tol = 1e-5 if q.dtype == torch.float32 and keys.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(keys.grad.double(), k64.grad, rtol=tol, atol=tol)


CASES = [
    # T, H, S, n, d_key, top_k, dtype, backward
    (40, 2, 1, 8, 8, 3, torch.float32, "triton"),  # shared keys, two row blocks (BLOCK_M=32), 2 dkeys splits
    (18, 2, 2, 8, 16, 8, torch.float32, "hybrid"),  # per-head keys, top_k == n
    (17, 3, 3, 16, 32, 5, torch.bfloat16, "triton"),  # per-head, top_k not a power of two, bf16
    (9, 1, 1, 4, 6, 4, torch.bfloat16, "dense"),  # half width 3 (padded to 16), top_k == n
    (12, 2, 1, 5, 8, 1, torch.float32, "hybrid"),  # top_k == 1, n not a power of two
    (10, 2, 1, 3, 4, 3, torch.float16, "dense"),  # n < padded top_k (4): sentinel slots must stay out
    (6, 2, 1, 40, 16, 2, torch.float32, "triton"),  # three sub-key tiles of BLOCK_N=16, the last ragged
]


@pytest.mark.parametrize("T,H,S,n,d_key,top_k,dtype,bwd", CASES)
def test_matches_reference(T, H, S, n, d_key, top_k, dtype, bwd):
    q, keys = retrieval_inputs(T, H, S, n, d_key, dtype)
    _check_against_reference(q, keys, top_k, config=RetrievalKernelConfig(forward="threshold", backward=bwd))


@pytest.mark.parametrize(
    "T,H,S,n,d_key,top_k,dtype",
    [(20, 2, 1, 8, 8, 3, torch.float32), (9, 2, 2, 4, 6, 4, torch.bfloat16), (10, 2, 1, 3, 4, 3, torch.float16)],
)
def test_merge_kernel_matches_reference(T, H, S, n, d_key, top_k, dtype):
    q, keys = retrieval_inputs(T, H, S, n, d_key, dtype)
    _check_against_reference(q, keys, top_k, config=RetrievalKernelConfig(forward="merge"))


def test_auto_forward_choice(monkeypatch):
    # above small_tokens tokens: "merge" for fp32 / mixed inputs with top_k <= 16, "threshold" otherwise
    # below queue_tokens (the small-token choice, "split", is tested in test_retrieval_split.py, "queue" in
    # test_retrieval_queue_auto.py)
    calls = []
    monkeypatch.setattr(triton_op, "launch_merge", lambda *a: calls.append("merge"))
    monkeypatch.setattr(triton_op, "launch_threshold", lambda *a: calls.append("threshold"))
    q, keys = retrieval_inputs(2, 1, 1, 32, 8, torch.float32)
    auto = RetrievalKernelConfig(forward="auto", small_tokens=1)
    triton_op.forward(q, keys, 16, auto)
    triton_op.forward(q, keys, 17, auto)
    triton_op.forward(q.bfloat16(), keys.bfloat16(), 16, auto)
    triton_op.forward(q.bfloat16(), keys, 4, auto)
    assert calls == ["merge", "threshold", "threshold", "merge"]


def _assert_valid_topk(q, keys, top_k, scores, idx):
    """For inputs with ties: the returned set is *a* top-k (indices may differ from brute force)."""
    ref_scores, _ = product_key_topk_reference(q.double(), keys.double(), top_k)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-5, atol=1e-5)  # both sorted
    n = keys.shape[2]
    dh = keys.shape[3]
    a, b = idx // n, idx % n
    s_set = 0 if keys.shape[0] == 1 else torch.arange(q.shape[1], device=q.device)[None, :, None]
    direct = (q[..., None, :dh].double() * keys[s_set, 0, a].double()).sum(-1)
    direct += (q[..., None, dh:].double() * keys[s_set, 1, b].double()).sum(-1)
    torch.testing.assert_close(scores.double(), direct, rtol=1e-5, atol=1e-5)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts


@pytest.mark.parametrize("impl", ["threshold", "merge"])
def test_repeated_key_rows_give_a_valid_topk(impl):
    # every sub-key row repeated 4 times: exact ties in both halves (and CAP overflows for "threshold":
    # both halves fall back); one head (the kernels' cost under the interpreter is per head)
    q, keys = retrieval_inputs(6, 1, 1, 32, 8, torch.float32, seed=6)
    keys = keys[:, :, torch.arange(32) // 4 * 4].contiguous()
    scores, idx = product_key_topk_triton(q, keys, 5, RetrievalKernelConfig(forward=impl))
    _assert_valid_topk(q, keys, 5, scores, idx)


def _threshold_cap(top_k, fp32):
    """The candidate slots per row (CAP) that triton_threshold.half_lists uses for DEFAULT_CONFIG on this
    device: 16 under the interpreter, the config's threshold launch on a GPU (64 for fp32, top_k <= 16)."""
    kp = max(2, next_pow2(top_k))
    cap = 16 if dispatch.triton_interpreting() else DEFAULT_CONFIG.threshold_launch(kp, fp32)[3]
    return max(next_pow2(cap), kp)


def test_candidate_overflow_falls_back_exactly():
    # half 1: rows 0..cap+8 tie at score 1, row n-1 scores 2, the rows between score -5. theta = 1
    # keeps cap + 10 candidates > CAP; without the fallback row n-1 (beyond the first CAP candidates
    # in column order) would be lost. Sized from the CAP in force (16 in the interpreter, 64 on the
    # H200, where a fixed 25 candidates did not overflow); the flags check fails if it is not.
    q, keys, n = cap_overflow_inputs(_threshold_cap(2, fp32=True))
    _, _, flags = triton_threshold.half_lists(q, keys, 2)
    assert flags.bool().any()
    scores, idx = triton_threshold.launch_threshold(q, keys, 2)
    assert (idx[..., 0] // n == n - 1).all()
    _assert_valid_topk(q, keys, 2, scores, idx)


def test_pair_lists_are_the_rank_products_up_to_k():
    pi, pj = triton_threshold.pair_lists(16, "cpu")
    assert pi.numel() == 50 == sum(16 // r for r in range(1, 17))
    assert ((pi + 1) * (pj + 1) <= 16).all()
    assert len(set(zip(pi.tolist(), pj.tolist()))) == 50


def test_unknown_impl_names():
    with pytest.raises(ValueError, match="forward must be one of"):
        RetrievalKernelConfig(forward="nope")
    with pytest.raises(ValueError, match="backward must be one of"):
        RetrievalKernelConfig(backward="nope")
    with pytest.raises(ValueError, match="theta must be one of"):
        RetrievalKernelConfig(theta="nope")


def test_mixed_dtypes_and_strided_queries():
    # bf16 queries against fp32 keys, queries a non-contiguous view (heads-major storage)
    q, keys = retrieval_inputs(7, 2, 1, 8, 8, torch.bfloat16, key_dtype=torch.float32)
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not q_strided.is_contiguous()
    _check_against_reference(q_strided, keys, 4)


def test_backward_chunks():
    # force several "dense" backward chunks (chunk = 64 // (H * n) = 2 tokens)
    q, keys = retrieval_inputs(7, 2, 2, 4, 8, torch.float32, seed=3)
    _check_against_reference(q, keys, 3, config=RetrievalKernelConfig(backward="dense", backward_chunk_elements=64))


def test_only_keys_need_grad():
    q, keys = retrieval_inputs(5, 2, 1, 4, 8, torch.float32, seed=4)
    keys.requires_grad_()
    scores, _ = product_key_topk_triton(q, keys, 2)
    scores.sum().backward()
    k64 = keys.detach().double().requires_grad_()
    product_key_topk_reference(q.double(), k64, 2)[0].sum().backward()
    torch.testing.assert_close(keys.grad.double(), k64.grad, rtol=1e-5, atol=1e-5)


def test_empty_tokens():
    q, keys = retrieval_inputs(0, 2, 1, 4, 8, torch.float32)
    scores, idx = product_key_topk_triton(q, keys, 3)
    assert scores.shape == idx.shape == (0, 2, 3)


def test_reference_is_exact_product_key_topk():
    # the reference itself: score of expert a*n+b is q1.C[a] + q2.C'[b]
    q, keys = retrieval_inputs(3, 2, 1, 4, 6, torch.float64)
    scores, idx = product_key_topk_reference(q, keys, 16)  # all n*n experts
    a, b = idx // 4, idx % 4
    direct = (q[..., None, :3] * keys[0, 0][a]).sum(-1) + (q[..., None, 3:] * keys[0, 1][b]).sum(-1)
    torch.testing.assert_close(scores, direct)
    assert sorted(idx[0, 0].tolist()) == list(range(16))


@pytest.mark.parametrize(
    "q_shape,k_shape,top_k,err,match",
    [
        ((4, 2, 8), (1, 2, 4, 4), 5, ValueError, r"top_k must be in \[1, n=4\]"),
        ((4, 2, 8), (1, 2, 4, 4), 0, ValueError, "top_k must be in"),
        ((4, 2, 8), (1, 2, 4, 4), 2.0, TypeError, "top_k must be an int"),
        ((4, 8), (1, 2, 4, 4), 2, ValueError, r"queries must be \(tokens, heads, d_key\)"),
        ((4, 2, 8), (2, 4, 4), 2, ValueError, r"sub_keys must be \(S, 2, n, d_key // 2\)"),
        ((4, 2, 8), (1, 2, 4, 3), 2, ValueError, "d_key // 2"),
        ((4, 2, 7), (1, 2, 4, 3), 2, ValueError, "d_key must be even"),
        ((4, 2, 8), (3, 2, 4, 4), 2, ValueError, r"1 \(shared keys\) or heads=2"),
    ],
)
def test_bad_input(q_shape, k_shape, top_k, err, match):
    with pytest.raises(err, match=match):
        product_key_topk_triton(torch.randn(q_shape), torch.randn(k_shape), top_k)


def test_bad_dtype_and_type():
    with pytest.raises(TypeError, match="floating point"):
        product_key_topk_triton(torch.ones(4, 2, 8, dtype=torch.int64), torch.randn(1, 2, 4, 4), 2)
    with pytest.raises(TypeError, match="torch.Tensors"):
        product_key_topk_triton([[0.0]], torch.randn(1, 2, 4, 4), 2)


def test_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_interpreting", lambda: False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        product_key_topk(torch.randn(4, 2, 8), torch.randn(1, 2, 4, 4), 2, backend="triton")


def test_large_top_k_falls_back_to_torch():
    # above max_kernel_kp the chunked PyTorch implementation answers, with the same contract
    q, keys = retrieval_inputs(5, 2, 1, 8, 8, torch.float32, seed=5)
    scores, idx = product_key_topk_triton(q, keys, 6, RetrievalKernelConfig(max_kernel_kp=4))
    ref_scores, ref_idx = product_key_topk_reference(q.double(), keys.double(), 6)
    assert torch.equal(idx.cpu(), ref_idx.cpu())
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-5, atol=1e-5)


def test_theta_by_topk():
    # the other way of finding the k-th largest group maximum (tl.topk instead of k rounds of max)
    q, keys = retrieval_inputs(12, 2, 1, 20, 8, torch.float32, seed=9)
    _check_against_reference(q, keys, 3, grads=False, config=RetrievalKernelConfig(forward="threshold", theta="topk"))


def test_torch_compile_fullgraph_matches_eager():
    """The kernels are torch.library custom ops: compile traces around them without graph breaks."""
    g = torch.Generator().manual_seed(11)
    # on DEVICE: product_key_topk_triton launches the kernels on whatever it is given (the device
    # check is the dispatcher's), and outside the interpreter Triton cannot read CPU tensors
    q = torch.randn(9, 2, 8, generator=g).to(DEVICE).requires_grad_()
    keys = torch.randn(1, 2, 6, 4, generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(9, 2, 3, generator=g).to(DEVICE)

    def loss(q, keys):
        scores, idx = product_key_topk_triton(q, keys, 3)
        return (scores * w).sum(), scores, idx

    want, want_s, want_idx = loss(q, keys)
    want_grads = torch.autograd.grad(want, (q, keys))
    got, got_s, got_idx = torch.compile(loss, fullgraph=True, backend="aot_eager")(q, keys)
    got_grads = torch.autograd.grad(got, (q, keys))
    assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(got_s, want_s)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_too_many_experts_for_the_index_packing():
    # 46341^2 > 2^31 - 1: the kernels' packed 31-bit index cannot hold it; the torch backend can
    q, keys = torch.randn(1, 1, 2), torch.randn(1, 2, 46341, 1)
    with pytest.raises(ValueError, match="int32 index packing"):
        product_key_topk_triton(q, keys, 2)
    _, idx = product_key_topk(q, keys, 2, backend="torch")
    assert idx.max() < 46341**2


def test_config_travels_into_the_custom_op_by_registry_index():
    from torchpeer.ops.retrieval.kernel_config import DEFAULT_CONFIG, config_by_id, config_id

    assert config_id(DEFAULT_CONFIG) == config_id(RetrievalKernelConfig()) == 0  # equal configs share one
    variant = RetrievalKernelConfig(backward="dense", theta="topk")
    assert config_by_id(config_id(variant)) == variant != DEFAULT_CONFIG
