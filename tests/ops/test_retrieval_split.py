"""The small-token ("split") Triton retrieval forward, the decode path: exact retrieval (indices equal
to the float64 brute force over all n*n keys, set equality with it), scores vs float64, gradients
through the usual backward; "auto" picks it for at most small_tokens tokens, and the PEER layer's
decode-sized calls give what the large-T kernels give. TRITON_INTERPRET=1 without a GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tests.ops.retrieval_inputs import DEVICE, retrieval_inputs  # noqa: E402
from torchpeer.ops import RetrievalKernelConfig, product_key_topk_reference  # noqa: E402
from torchpeer.ops.retrieval import triton_op  # noqa: E402
from torchpeer.ops.retrieval.triton_op import product_key_topk_triton  # noqa: E402

SPLIT = RetrievalKernelConfig(forward="split")


CASES = [
    # T, H, S, n, d_key, top_k, dtype
    (1, 2, 1, 40, 16, 5, torch.float32),  # one decode token; three sub-key tiles of 16, the last ragged
    (5, 3, 3, 16, 8, 4, torch.float32),  # per-head keys, one tile
    (19, 1, 1, 33, 8, 8, torch.bfloat16),  # two row blocks (BLOCK_M 16), bf16, ragged tile of 1 key
    (3, 2, 1, 3, 4, 3, torch.float32),  # n < padded top_k (4): sentinels stay out of the pairs
    (4, 1, 1, 20, 6, 1, torch.float16),  # top_k 1, half width 3 (padded to 16)
]


@pytest.mark.parametrize("T,H,S,n,d_key,top_k,dtype", CASES)
def test_split_matches_float64_brute_force(T, H, S, n, d_key, top_k, dtype):
    q, keys = retrieval_inputs(T, H, S, n, d_key, dtype)
    q, keys = q.requires_grad_(), keys.requires_grad_()
    scores, idx = product_key_topk_triton(q, keys, top_k, SPLIT)
    q64, k64 = q.detach().double().requires_grad_(), keys.detach().double().requires_grad_()
    ref_s, ref_i = product_key_topk_reference(q64, k64, top_k)
    assert scores.shape == idx.shape == (T, H, top_k) and scores.dtype == torch.float32
    assert torch.equal(idx.cpu(), ref_i.cpu())  # same order, so the same sets
    assert all(set(a) == set(b) for a, b in zip(idx.reshape(-1, top_k).tolist(), ref_i.reshape(-1, top_k).tolist()))
    torch.testing.assert_close(scores.double(), ref_s, rtol=1e-5, atol=1e-5)
    up = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (scores * up).sum().backward()
    (ref_s * up.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(keys.grad.double(), k64.grad, rtol=tol, atol=tol)


def test_split_equals_the_large_token_kernels_with_ties():
    """Repeated sub-key rows (exact ties): "split" returns the indices "threshold" and "merge" return
    (the packed (score, -index) order breaks ties the same way everywhere). One head: the kernels'
    cost under the interpreter is per head."""
    q, keys = retrieval_inputs(5, 1, 1, 20, 8, torch.float32, seed=3)
    keys = keys[:, :, torch.arange(20) % 5]  # every sub-key 4 times
    got = product_key_topk_triton(q, keys, 6, SPLIT)
    for other in ("threshold", "merge"):
        want = product_key_topk_triton(q, keys, 6, RetrievalKernelConfig(forward=other))
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), other


def test_auto_takes_split_up_to_small_tokens(monkeypatch):
    calls = []
    for name in ("launch_split", "launch_merge", "launch_threshold"):
        monkeypatch.setattr(triton_op, name, lambda *a, name=name: calls.append(name[7:]))
    cfg = RetrievalKernelConfig(small_tokens=4)
    for T in (1, 4, 5):
        q, keys = retrieval_inputs(T, 1, 1, 32, 8, torch.float32)
        triton_op.forward(q, keys, 4, cfg)
    triton_op.forward(*retrieval_inputs(3, 1, 1, 32, 8, torch.float32), 4, RetrievalKernelConfig(small_tokens=0))
    assert calls == ["split", "split", "merge", "merge"]
    assert RetrievalKernelConfig().small_tokens == 64  # the default decode threshold


def test_peer_decode_steps_match_the_large_token_path():
    """A PEER layer (Triton backends) in eval mode: one token, and 3 tokens at once, give the experts
    and outputs of the same tokens inside a call above small_tokens (the large-T kernels). The experts
    are the router's scores and indices inside each forward (what layer.retrieve returns, tests/layers/
    test_peer.py), so each token count retrieves once."""
    from torchpeer import PEER

    torch.manual_seed(0)
    layer = PEER(16, n_experts=24**2, heads=2, top_k=4, d_key=8, backend="triton").to(DEVICE).eval()
    layer.router.retrieval_config = RetrievalKernelConfig(small_tokens=3)
    routed = []
    layer.router.register_forward_hook(lambda module, args, out: routed.append(out[1:]))

    def forward(x):
        """-> (scores, indices) (tokens, heads, top_k) of the forward's retrieval, and its output."""
        routed.clear()
        y = layer(x)
        assert len(routed) == 1
        return *(t.view(len(x), 2, 4) for t in routed[0]), y

    x = torch.randn(9, 16, device=DEVICE)
    with torch.no_grad():
        s_big, i_big, y_big = forward(x)  # 9 tokens > small_tokens: fp32 "merge"
        for rows in (slice(0, 1), slice(5, 8)):
            s, i, y = forward(x[rows])
            assert torch.equal(i, i_big[rows])
            torch.testing.assert_close(s, s_big[rows], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(y, y_big[rows], rtol=1e-5, atol=1e-6)
