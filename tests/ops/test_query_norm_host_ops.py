"""Host work of the fused "ema" query norm per training step (issue 19: at 4096 tokens its time was
the host's, not the kernels'): Triton launches, the torch ops around them, no host syncs, and the
custom ops that torch.compile sees. Counted on the CPU under Triton's interpreter (the launches
are counted, not run, where only the count matters).

Per step (EMAQueryNorm, backend "triton", train mode, BatchNorm-style gradient):
  forward  1 Triton launch (value, split statistics and running-statistics update), no torch op
           that launches a kernel (only allocations and views), one custom op under dispatch;
  backward 2 Triton launches, likewise; eval forward 1 launch. No .item() / host sync anywhere.

    TRITON_INTERPRET=1 python tests/ops/test_query_norm_host_ops.py   # prints the counts
"""

import collections
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tests.ops.op_recorder import OpRecorder  # noqa: E402
from torchpeer.layers.query_norm import EMAQueryNorm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Profiler op names that allocate or re-view memory without launching a kernel.
NO_KERNEL_OPS = {
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::view", "aten::view_as",
    "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::contiguous", "aten::detach", "detach",
    "aten::alias", "aten::_unsafe_view",
}  # fmt: skip
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "cudaStreamSynchronize", "cudaDeviceSynchronize")


def _count_launches(monkeypatch, run_them: bool) -> collections.Counter:
    """Counter of Triton kernel launches by kernel name from now on; run_them=False (the
    interpreter only) skips running them: the interpreter's own tensor copies stay out of a
    profile (on a GPU the launcher calls no torch op, and the kernels always run)."""
    counts = collections.Counter()
    if DEVICE == "cuda":
        from triton.runtime.jit import JITFunction as Kernel
    else:
        from triton.runtime.interpreter import InterpretedFunction as Kernel
    run = Kernel.run

    def counting_run(self, *args, **kwargs):
        counts[self.__name__] += 1
        if run_them or DEVICE == "cuda":
            return run(self, *args, **kwargs)

    monkeypatch.setattr(Kernel, "run", counting_run)
    return counts


@pytest.fixture
def launches(monkeypatch):
    return _count_launches(monkeypatch, run_them=True)


def _norm_and_inputs(T=40):
    torch.manual_seed(0)
    m = EMAQueryNorm(2, 16, backend="triton").to(DEVICE).train()  # 32 features: 2 blocks in the interpreter
    q = torch.randn(T, 2, 16, device=DEVICE, requires_grad=True)
    return m, q, torch.randn(T, 2, 16, device=DEVICE)


def _profile(fn):
    """-> names of the profiler's events during fn() (CPU activity: every dispatched op)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def _kernel_ops(names):
    return sorted({n for n in names if n.startswith("aten::") and n not in NO_KERNEL_OPS})


def test_one_launch_forward_two_launch_backward(launches):
    m, q, up = _norm_and_inputs()
    m(q).backward(up)  # warm-up (compiles / rewrites the kernels)
    launches.clear()
    y = m(q)
    assert dict(launches) == {"_fwd_update_kernel": 1}
    launches.clear()
    y.backward(up)
    assert dict(launches) == {"_bwd_reduce_kernel": 1, "_bwd_dx_kernel": 1}
    launches.clear()
    m.eval()
    with torch.no_grad():
        m(q)
    assert dict(launches) == {"_fwd_kernel": 1}
    assert int(m.num_updates) == 2


def test_no_torch_op_launches_a_kernel_and_no_host_sync(monkeypatch):
    """Around the Triton launches only allocations and views: no memset (zeros), no copy, no
    num_updates.add_, no .item(). (The autograd engine's own gradient accumulation into q.grad,
    weight.grad, bias.grad is not the norm's and stays out: the leaves' grads are None.)"""
    m, q, up = _norm_and_inputs()
    m(q).backward(up)
    for p in (q, m.weight, m.bias):
        p.grad = None
    launches = _count_launches(monkeypatch, run_them=False)
    names = _profile(lambda: m(q).backward(up))
    assert sum(launches.values()) == 3
    assert _kernel_ops(names) == []
    assert not [n for n in names if n in SYNC_OPS]


def test_one_custom_op_per_forward_and_per_backward():
    """Under a TorchDispatchMode (as under torch.compile) the norm is one custom op in the forward
    (the mutating ema_norm_fwd_update) and one in the backward; no other op that computes."""
    m, q, up = _norm_and_inputs()
    with OpRecorder() as mode:
        y = m(q)
    fwd = dict(mode.ops)
    with OpRecorder() as mode:
        y.backward(up)
    bwd = dict(mode.ops)
    views = {"aten.view", "aten._unsafe_view", "aten.reshape", "aten.detach", "aten.alias"}
    assert {k: v for k, v in fwd.items() if k not in views} == {"torchpeer.ema_norm_fwd_update": 1}
    assert {k: v for k, v in bwd.items() if k not in views} == {"torchpeer.ema_norm_bwd": 1}


def _print_counts():
    """The numbers quoted in benchmarks/NOTES_issue19.md, section 7."""
    _count_launches(pytest.MonkeyPatch(), run_them=False)
    m, q, up = _norm_and_inputs()
    m(q).backward(up)
    for p in (q, m.weight, m.bias):
        p.grad = None
    for name, fn in (("train forward", lambda: m(q)), ("train forward+backward", lambda: m(q).backward(up))):
        names = _profile(fn)
        aten = collections.Counter(n for n in names if n.startswith("aten::"))
        print(f"{name}: {sum(aten.values())} aten ops {dict(aten)}; kernel-launching: {_kernel_ops(names)}")
        for p in (q, m.weight, m.bias):
            p.grad = None


if __name__ == "__main__":
    _print_counts()
