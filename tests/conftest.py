"""Test-session setup: without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1).

It must be set before any kernel module is imported (triton.jit reads it when a kernel is defined),
so it is set here, once, for the whole session.

One intra-op thread (OMP_NUM_THREADS=1 unless it is set already; subprocesses inherit it): the
tests' tensors are tiny, and on a 2-core host shared with other processes (the CI's own, a training
run) torch's default of one thread per core oversubscribed the cores, its threads waiting on one
another: tests/lm/test_train.py + tests/test_measure_readme.py took 217 s with the default and 57 s
with one thread, back to back at load ~5 (2026-12-07). Every test tolerance is unchanged. The README's
command runs one test process per core (`-n auto`, pytest-xdist), each then on one thread: 631 s against
1,006 s in one process on the 2-core host (2026-12-07).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import torch  # noqa: E402 (after OMP_NUM_THREADS is set)

if os.environ["OMP_NUM_THREADS"].isdigit():  # in case torch was imported before this file
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


from tests.triton_interpreter import setup  # noqa: E402 (after TRITON_INTERPRET is set)

setup()
