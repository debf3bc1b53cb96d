"""Checkpoints written by the code before the layers/ops re-layout (commit 9253f8b) still load.

The fixtures (tests/fixtures/old_checkpoints/, made by make.py there with the old code) hold one tiny
TransformerLM per FFW kind and the eval-mode logits the old code computed on fixed token ids.
"""

import os

import pytest
import torch
from safetensors.torch import load_file

from torchpeer.lm import load_model_from_checkpoint

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "old_checkpoints")
KINDS = ("dense", "peer", "pkm", "moe")


@pytest.fixture(scope="module")
def expected():
    return load_file(os.path.join(FIXTURES, "expected.safetensors"))


@pytest.mark.parametrize("kind", KINDS)
def test_old_checkpoint_loads_and_gives_the_old_logits(kind, expected):
    model, cfg, _ = load_model_from_checkpoint(os.path.join(FIXTURES, kind))
    assert cfg.model.ffw == kind
    with torch.no_grad():
        logits, _ = model(expected[f"{kind}.idx"])
    ref = expected[f"{kind}.logits"]
    assert logits.abs().max() > 0  # non-trivial outputs
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
