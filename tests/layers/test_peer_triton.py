"""PEER with backend="triton" (the kernels under TRITON_INTERPRET=1 on the CPU) == float64 reference."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from tests.references import assert_backward_matches  # noqa: E402
from torchpeer.layers.peer import PEER  # noqa: E402

from .test_peer import reference_forward  # noqa: E402

# the kernels run on CUDA tensors, or on the CPU only under the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("gate,activation,shared", [("softmax", "gelu", True), ("sigmoid", "relu", False)])
def test_triton_backend_matches_float64_reference(gate, activation, shared):
    torch.manual_seed(1)
    kw = dict(n_experts=49, heads=2, top_k=3, d_key=8, gate=gate, activation=activation, shared_keys=shared)
    m = PEER(16, backend="triton", **kw).to(DEVICE)
    # the float64 twin on the same device (plain PyTorch everywhere, norm included: backend "reference")
    ref = PEER(16, backend="reference", **kw).double().to(DEVICE)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(13, 16).to(DEVICE).requires_grad_()  # ragged token count
    x_ref = x.detach().double().requires_grad_()
    assert_backward_matches(m, ref, x, x_ref, m(x), reference_forward(ref, x_ref))


def test_auto_backend_is_torch_on_cpu():
    m = PEER(8, n_experts=16, heads=1, top_k=2, d_key=4)
    assert m.op_backends() == {"product_key_topk": "torch", "expert_mix": "torch"}
    assert m.op_backends("cpu") == m.op_backends(torch.device("cpu"))
