"""The column-sliced Triton path of the sharded PEER layer on 2 and 4 gloo processes (the kernels in
Triton's interpreter): equal to the one-process layer (its float64 reference and its one-GPU Triton
kernels), the fused row-wise Adam's update included; and under torch.compile, alone and inside DDP."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the spawned ranks

pytest.importorskip("triton")

from tests.parallel.spawn import run_workers  # noqa: E402
from tests.parallel.triton_workers import check_all  # noqa: E402


def _run(tmp_path, world, cases, expected):
    run_workers(check_all, world, cases, str(tmp_path))
    for name in expected:
        assert os.path.exists(tmp_path / name), name


def test_sharded_triton_layer_and_compile_on_2_ranks(tmp_path):
    # hot experts split into segments of 8 (and not), relu / EMA norm / sigmoid gates, the fused
    # update, then torch.compile of the layer (fullgraph) and of DDP around a model that holds it
    cases = [("layer", "peer", 8), ("layer", "relu_ema", None), ("rowwise", 2), ("compile",)]
    _run(tmp_path, 2, cases, ["ok_peer_2_8", "ok_relu_ema_2_None", "ok_rowwise_2_2", "ok_compile_2"])


def test_sharded_triton_layer_on_4_ranks(tmp_path):
    # one step of the fused update (the 2-rank test checks the moments' history over two)
    _run(tmp_path, 4, [("layer", "peer", 8), ("rowwise", 1)], ["ok_peer_4_8", "ok_rowwise_4_1"])
