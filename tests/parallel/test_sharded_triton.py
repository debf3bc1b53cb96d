"""The sharded PEER/PKM layers on 2 and 4 gloo processes, one spawn per world size for both paths:

- the torch path (float64) == the single-process layer: outputs, input/table/replicated-parameter
  gradients, BatchNorm statistics and usage scores (workers: layer_workers.py);
- the column-sliced Triton path (the kernels in Triton's interpreter) == the one-process layer (its
  float64 reference and its one-GPU Triton kernels), the fused lazy Adam's update included (row-wise
  and element-wise second moments); and
  under torch.compile, alone and inside DDP (workers: triton_workers.py)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the spawned ranks

pytest.importorskip("triton")

from tests.parallel.spawn import run_workers  # noqa: E402
from tests.parallel.triton_workers import check_all  # noqa: E402


def _torch_ok(world, kind, counts):
    return f"ok_{kind}_{world}" if kind in ("autocast", "usage") else f"ok_{kind}_{world}_{counts}"


def _run(tmp_path, world, torch_cases, cases, expected):
    run_workers(check_all, world, [("torch", *c) for c in torch_cases] + cases, str(tmp_path))
    for name in [_torch_ok(world, *c) for c in torch_cases] + expected:
        assert os.path.exists(tmp_path / name), name


def test_sharded_layers_torch_and_triton_and_compile_on_2_ranks(tmp_path):
    # torch: PEER (gelu, BatchNorm queries), PEER (EMA query norm), PEER (relu, LayerNorm, 3 heads), PKM
    # with value_dim != d_model, an uneven split of the tokens (evaluation's last batch), and bf16
    # autocast (the GPU dtype)
    torch_cases = [("peer", None), ("peer_ema", None), ("peer_relu_layernorm", None), ("pkm", None), ("peer", [5, 9])]
    torch_cases.append(("autocast", None))
    # Triton: hot experts split into segments of 8 (and not), relu / EMA norm / sigmoid gates, the
    # fused update, then torch.compile of the layer (fullgraph) and of DDP around a model that holds it
    cases = [("layer", "peer", 8), ("layer", "relu_ema", None), ("rowwise", 2, False), ("rowwise", 2, True)]
    cases.append(("compile",))
    expected = ["ok_peer_2_8", "ok_relu_ema_2_None", "ok_rowwise_2_2", "ok_rowwise_2_2_elementwise", "ok_compile_2"]
    _run(tmp_path, 2, torch_cases, cases, expected)


def test_sharded_layers_torch_and_triton_on_4_ranks(tmp_path):
    # torch: PEER, PKM on an uneven split with an empty rank, and the usage reduction of routers that
    # see only their rank's tokens (the union of experts); Triton: the layer and one step of the fused
    # update (the 2-rank test checks the moments' history over two)
    torch_cases = [("peer", None), ("pkm", [0, 3, 1, 4]), ("usage", None)]
    _run(tmp_path, 4, torch_cases, [("layer", "peer", 8), ("rowwise", 1, False)], ["ok_peer_4_8", "ok_rowwise_4_1"])
