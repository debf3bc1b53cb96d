"""Old import path of the Triton kernels; they live in torchpeer.ops.retrieval and torchpeer.ops.expert_mixing."""
