"""The retrieval backward's kernels take the forward's int64 indices and split a * n + b in registers
(triton_backward._dq_kernel, _dkeys_kernel, triton_backward_sorted._table_rows_kernel): gradients
of the "triton", "hybrid" and "sorted" backwards against float64 autograd, no index-splitting torch
ops (floor_divide, remainder, stack) in the backward, and an ahead-of-time sm_90 compile of the three
kernels. TRITON_INTERPRET=1 without a GPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tests.ops.op_recorder import OpRecorder  # noqa: E402
from tests.ops.retrieval_inputs import DEVICE, retrieval_inputs  # noqa: E402
from tests.ops.sm90_aot import run_without_interpreter  # noqa: E402
from torchpeer.ops import RetrievalKernelConfig, product_key_topk_reference  # noqa: E402
from torchpeer.ops.retrieval.triton_backward import backward  # noqa: E402


@pytest.mark.parametrize("impl", ["triton", "hybrid", "sorted"])
@pytest.mark.parametrize(
    "T,H,S,n,d_key,top_k,dtype",
    [
        (19, 3, 1, 24, 16, 5, torch.float32),  # ragged row blocks, top_k not a power of two
        (11, 2, 2, 40, 8, 4, torch.float32),  # per-head keys: the key set of row r is its head
        (9, 2, 1, 20, 32, 3, torch.bfloat16),
    ],
)
def test_backward_matches_float64(impl, T, H, S, n, d_key, top_k, dtype):
    q, keys = retrieval_inputs(T, H, S, n, d_key, dtype)
    # the selection from the float64 reference (int64 (T, H, top_k), as every forward returns: they
    # equal it, test_retrieval_triton.py and the per-forward tests); no forward kernel under the
    # interpreter (the "merge" kernel took 2/3 of this test's time)
    q64, k64 = q.double().requires_grad_(), keys.double().requires_grad_()
    ref_s, idx = product_key_topk_reference(q64, k64, top_k)
    assert idx.dtype == torch.int64 and idx.is_contiguous()
    ds = torch.randn(idx.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with OpRecorder() as rec:
        dq, dk = backward(ds, q, keys, idx, True, True, RetrievalKernelConfig(backward=impl))
    # "hybrid"'s dense sub-key gradient still divides the indices (idx // n, idx % n per chunk, for
    # its scatter_add); its dq kernel, like both kernels of the others, splits them in registers
    banned = ("aten.stack",) if impl == "hybrid" else ("aten.floor_divide", "aten.remainder", "aten.stack", "aten.div")
    for name in banned:
        assert rec.ops[name] == 0, (impl, name)
    # the same selection through float64 autograd: scores = q1 . C[a] + q2 . C'[b] at the given indices
    (ref_s * ds.double()).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(dq.double(), q64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(dk.double(), k64.grad, rtol=tol, atol=tol)


_AOT = """
from tests.ops.sm90_aot import aot
from torchpeer.ops.retrieval import triton_backward as tb, triton_backward_sorted as sb

def ok(fn, types, consts):
    aot(fn, types, consts, say=False)
    print("ok", fn.__name__, flush=True)

ok(tb._dq_kernel, {"ds_ptr": "*fp32", "idx_ptr": "*i64", "k_ptr": "*bf16", "dq_ptr": "*bf16"},
   dict(PER_HEAD=False, K=16, DH=64, BLOCK_R=32, BLOCK_D=64))
ok(tb._dkeys_kernel, {"ds_ptr": "*fp32", "idx_ptr": "*i64", "q_ptr": "*bf16", "part_ptr": "*fp32"},
   dict(PER_HEAD=True, K=16, DH=64, BLOCK_A=128, BLOCK_R=32, BLOCK_D=64, DOT_FP32=False))
ok(sb._table_rows_kernel, {"idx_ptr": "*i64", "rows_ptr": "*i32"}, dict(H=8, K=16, PER_HEAD=True, BLOCK=1024))
"""


def test_backward_kernels_compile_for_sm90():
    out = run_without_interpreter("-c", _AOT)
    assert out.count("ok ") == 3
