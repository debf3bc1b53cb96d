"""Test-session setup: without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1).

It must be set before any kernel module is imported (triton.jit reads it when a kernel is defined),
so it is set here, once, for the whole session.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from tests.triton_interpreter import setup  # noqa: E402 (after TRITON_INTERPRET is set)

setup()
