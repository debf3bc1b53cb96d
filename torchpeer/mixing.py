"""Old import path of the PyTorch expert mixing; the code lives in torchpeer.ops.expert_mixing."""

from .ops.expert_mixing import ACTIVATIONS
from .ops.expert_mixing import expert_mix_reference as peer_mix_reference
from .ops.expert_mixing import expert_mix_torch as peer_mix_torch

__all__ = ["ACTIVATIONS", "peer_mix_reference", "peer_mix_torch"]
