"""Column-sharded PEER/PKM in 2 and 4 gloo processes == the single-process layer (float64):
outputs, input/table/replicated-parameter gradients, BatchNorm statistics and usage scores."""

import os

from tests.parallel.layer_workers import check_layers
from tests.parallel.spawn import run_workers


def _run(tmp_path, world, cases):
    run_workers(check_layers, world, cases, str(tmp_path))
    for kind, counts in cases:
        name = f"ok_{kind}_{world}" if kind in ("autocast", "usage") else f"ok_{kind}_{world}_{counts}"
        assert os.path.exists(tmp_path / name), (kind, counts)


def test_sharded_layers_equal_single_process_on_2_ranks(tmp_path):
    # PEER (gelu, BatchNorm queries), PEER (EMA query norm), PEER (relu, LayerNorm, 3 heads), PKM with
    # value_dim != d_model,
    # an uneven split of the tokens (evaluation's last batch), and bf16 autocast (the GPU dtype)
    cases = [("peer", None), ("peer_ema", None), ("peer_relu_layernorm", None), ("pkm", None), ("peer", [5, 9])]
    cases.append(("autocast", None))
    _run(tmp_path, 2, cases)


def test_sharded_peer_equals_single_process_on_4_ranks(tmp_path):
    # and the usage reduction of routers that see only their rank's tokens (the union of experts)
    _run(tmp_path, 4, [("peer", None), ("pkm", [0, 3, 1, 4]), ("usage", None)])
