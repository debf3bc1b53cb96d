"""Old import path of the Triton expert mixing; the code lives in torchpeer.ops.expert_mixing (triton_*.py)."""

from torchpeer.ops.expert_mixing import expert_mix_reference as peer_mix_naive
from torchpeer.ops.expert_mixing.triton_op import expert_mix_triton as peer_mix_triton

__all__ = ["peer_mix_triton", "peer_mix_naive"]
