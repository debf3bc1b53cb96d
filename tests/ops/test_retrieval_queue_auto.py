"""The "auto" forward's "queue" choice (issue 19, decided by the H100 check rows of 2026-12-05,
benchmarks/results/bench_retrieval_checks_2026-12-05_h100.md): "queue" for bf16/fp16 inputs with
top_k <= 16 and at least config.queue_tokens tokens where the queue kernel takes n; "split", "merge" and
"threshold" otherwise, as before. Under TRITON_INTERPRET=1 without a GPU; the choice needs no launch
(empty tensors), the one forward that runs is small."""

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tests.ops.retrieval_inputs import DEVICE, check_brute_force, retrieval_inputs, same_result  # noqa: E402
from torchpeer.ops.retrieval import triton_op, triton_queue  # noqa: E402
from torchpeer.ops.retrieval.kernel_config import DEFAULT_CONFIG  # noqa: E402
from torchpeer.ops.retrieval.triton_common import dot_fp32  # noqa: E402
from torchpeer.ops.retrieval.triton_op import forward_impl, product_key_topk_triton  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def _impl(T, top_k, cfg, dtype=BF16, key_dtype=None, n=32):
    q = torch.empty(T, 1, 8, dtype=dtype)
    keys = torch.empty(1, 2, n, 4, dtype=key_dtype or dtype)
    return forward_impl(q, keys, top_k, cfg)


def _max_queue_n(cfg, top_k=16):
    """The largest n the queue kernel takes: 256 tiles of its BLOCK_N (16 in the interpreter, 64 on a GPU)."""
    half = torch.empty(1, 1, 2, dtype=BF16)
    return 256 * triton_queue.queue_launch(64, top_k, dot_fp32(half, half), cfg)["BLOCK_N"]


def test_auto_resolves_queue_only_where_measured():
    assert DEFAULT_CONFIG.queue_tokens == 16384
    assert _impl(16384, 16, DEFAULT_CONFIG) == "queue"
    assert _impl(65536, 16, DEFAULT_CONFIG, dtype=FP16) == "queue"
    assert _impl(16383, 16, DEFAULT_CONFIG) == "threshold"  # below the measured T
    cfg = dataclasses.replace(DEFAULT_CONFIG, queue_tokens=100)
    assert _impl(100, 16, cfg) == _impl(100, 1, cfg) == _impl(500, 16, cfg, dtype=FP16) == "queue"
    assert _impl(99, 16, cfg) == "threshold"
    assert _impl(64, 16, cfg) == "split"  # small_tokens first
    assert _impl(100, 17, cfg) == _impl(100, 32, cfg) == "threshold"  # top_k 32: queue speed unmeasured
    assert _impl(100, 16, cfg, dtype=FP32) == _impl(100, 16, cfg, dtype=BF16, key_dtype=FP32) == "merge"
    assert _impl(100, 32, cfg, dtype=FP32) == "threshold"
    assert _impl(100, 16, dataclasses.replace(cfg, queue_tokens=0)) == "threshold"  # 0: never
    assert _impl(100, 16, dataclasses.replace(cfg, forward="threshold")) == "threshold"
    with pytest.raises(ValueError, match="queue_tokens"):
        dataclasses.replace(cfg, queue_tokens=-1)


def test_auto_never_picks_queue_where_it_raises():
    cfg = dataclasses.replace(DEFAULT_CONFIG, queue_tokens=100)
    n = _max_queue_n(cfg)
    assert _impl(100, 16, cfg, n=n) == "queue"
    assert _impl(100, 16, cfg, n=n + 1) == "threshold"
    q, keys = torch.zeros(100, 1, 8, dtype=BF16), torch.zeros(1, 2, n + 1, 4, dtype=BF16)
    with pytest.raises(ValueError, match="256 tiles"):  # what auto avoids
        triton_queue.launch_queue(q, keys, 16, cfg)


@pytest.mark.parametrize("S,top_k", [(1, 16), (2, 5)])  # shared keys at k 16; per-head keys at k 5
def test_auto_queue_forward_is_bit_equal_to_threshold(monkeypatch, S, top_k):
    cfg = dataclasses.replace(DEFAULT_CONFIG, small_tokens=8, queue_tokens=20)
    calls = []
    launch = triton_op.launch_queue
    monkeypatch.setattr(triton_op, "launch_queue", lambda *a, **k: calls.append(1) or launch(*a, **k))
    q, keys = retrieval_inputs(21, 2, S, 40, 16, BF16, seed=11)
    got = product_key_topk_triton(q, keys, top_k, cfg)
    assert calls == [1]  # auto ran the queue kernel
    assert same_result(got, product_key_topk_triton(q, keys, top_k, dataclasses.replace(cfg, forward="threshold")))
    check_brute_force(q, keys, top_k, got, 1e-5)
    assert got[0].device.type == torch.device(DEVICE).type
