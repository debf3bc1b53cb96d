"""The backend dispatcher: "auto" picks, a requested backend that cannot run is one clear error, the
choice is logged once; every backend of the public ops answers like the reference."""

import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch

from torchpeer import ops
from torchpeer.ops import dispatch

LOGGER = "torchpeer.ops"


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    monkeypatch.setattr(dispatch, "_logged", set())


@pytest.mark.parametrize("op", dispatch.OPS)
def test_auto_is_torch_on_cpu_even_under_the_interpreter(op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve_backend(op, "auto", torch.device("cpu")) == "torch"
    assert ops.resolve_backend(op, "auto", "cpu") == "torch"


@pytest.mark.parametrize("op", dispatch.OPS)
def test_auto_is_triton_on_cuda_when_installed_else_torch(op, monkeypatch):
    monkeypatch.setattr(dispatch, "triton_installed", lambda: True)
    assert ops.resolve_backend(op, "auto", "cuda:0") == "triton"
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    assert ops.resolve_backend(op, "auto", "cuda:0") == "torch"


@pytest.mark.parametrize("op", dispatch.OPS)
def test_requested_triton_on_cpu_without_interpreter_is_an_error(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=rf"{op}: backend='triton' cannot run here: .*use backend='torch'") as e:
        ops.resolve_backend(op, "triton", "cpu")
    assert "TRITON_INTERPRET=1" in str(e.value)


def test_requested_triton_without_the_package_is_an_error(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    with pytest.raises(ValueError, match="pip install triton"):
        ops.resolve_backend("expert_mix", "triton", "cuda")


def test_triton_under_the_interpreter_and_explicit_backends(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve_backend("product_key_topk", "triton", "cpu") == "triton"
    for backend in ("torch", "reference"):
        assert ops.resolve_backend("expert_mix", backend, "cpu") == backend


def test_unknown_op_or_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.resolve_backend("expert_mix", "cuda", "cpu")
    with pytest.raises(ValueError, match="unknown op"):
        ops.resolve_backend("peer_mix", "auto", "cpu")


def test_the_choice_is_logged_once_per_op_backend_device(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    for _ in range(3):
        ops.resolve_backend("product_key_topk", "auto", "cpu")
    ops.resolve_backend("product_key_topk", "torch", "cpu")  # same (op, backend, device): not again
    ops.resolve_backend("expert_mix", "reference", "cpu")
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert msgs == [
        "product_key_topk on cpu: backend 'torch' (requested 'auto')",
        "expert_mix on cpu: backend 'reference' (requested 'reference')",
    ]


def test_public_ops_log_and_refuse(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger=LOGGER)
    q, keys = torch.randn(5, 2, 8), torch.randn(1, 2, 4, 4)
    ops.product_key_topk(q, keys, 2)
    assert any("product_key_topk on cpu: backend 'torch'" in r.getMessage() for r in caplog.records)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' cannot run here"):
        ops.expert_mix(torch.randn(5, 8), torch.randn(9, 8), torch.randn(9, 8), torch.zeros(5, 1, 2).long(),
                       torch.rand(5, 1, 2), backend="triton")  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "reference", "triton"])
def test_every_backend_of_the_public_ops_matches_the_reference(backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    q = torch.randn(11, 2, 8, generator=g).to(device).requires_grad_()
    keys = torch.randn(1, 2, 6, 4, generator=g).to(device).requires_grad_()
    scores, idx = ops.product_key_topk(q, keys, 3, backend=backend)
    ref_s, ref_i = ops.product_key_topk_reference(q.double(), keys.double(), 3)
    assert scores.dtype == torch.float32 and torch.equal(idx, ref_i)
    torch.testing.assert_close(scores.double(), ref_s, rtol=1e-5, atol=1e-5)

    x = torch.randn(11, 16, generator=g).to(device).requires_grad_()
    down, up = (torch.randn(36, 16, generator=g).to(device).requires_grad_() for _ in range(2))
    gates = scores.softmax(-1)
    y = ops.expert_mix(x, down, up, idx, gates, "gelu", backend=backend)
    leaves = (x, down, up, q, keys)
    dy = torch.randn(y.shape, generator=g).to(device)
    got = torch.autograd.grad(y, leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    xr, dr, ur, qr, kr = ref_leaves
    sr, ir = ops.product_key_topk_reference(qr, kr, 3)
    y_ref = ops.expert_mix_reference(xr, dr, ur, ir, sr.softmax(-1), "gelu")
    want = torch.autograd.grad(y_ref, ref_leaves, dy.double())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(got, want):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_public_ops_compile_fullgraph_with_the_dispatcher(monkeypatch):
    """resolve_backend runs inside a compiled region without a graph break (PEER calls it in forward)."""
    q, keys = torch.randn(7, 2, 8), torch.randn(1, 2, 4, 4)

    def f(q, keys):
        scores, idx = ops.product_key_topk(q, keys, 2)
        return scores * 2.0, idx

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, keys)
    want = f(q, keys)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


def test_the_first_backend_choice_can_happen_inside_a_fullgraph_compile():
    """On the H200 (torch 2.11) PEER's fused norm failed to compile with fullgraph=True: its first
    resolve_backend ran under torch.compile and looked Triton up with importlib.util.find_spec, which
    that dynamo refuses to trace. The lookup is made once at import; a fresh process whose first
    choices are traced (a Triton lookup made to fail after the import) compiles and answers as eager."""
    code = (
        "import importlib.util, torch\n"
        "from torchpeer.ops import dispatch\n"
        "torch.compile(lambda x: x + 1, backend='eager', fullgraph=True)(torch.zeros(1))  # dynamo's own imports\n"
        "find_spec = importlib.util.find_spec\n"
        "def refuse(name, *a, **k):\n"
        "    assert name != 'triton', 'Triton looked up after import'\n"
        "    return find_spec(name, *a, **k)\n"
        "importlib.util.find_spec = refuse\n"
        "def f(x):\n"
        "    for op in dispatch.OPS:\n"
        "        for req in ('auto', 'triton', 'torch', 'reference'):\n"
        "            for dev in ('cuda', 'cpu'):\n"
        "                x = x + len(dispatch.resolve_backend(op, req, dev))\n"
        "    return x\n"
        "got = torch.compile(f, backend='eager', fullgraph=True)(torch.zeros(1))\n"
        "assert torch.equal(got, f(torch.zeros(1))), (got, f(torch.zeros(1)))\n"
        "print('ok', dispatch.triton_installed())\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # requested "triton" on the CPU runs (interpreter)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    installed = importlib.util.find_spec("triton") is not None
    assert out.stdout.split() == ["ok", str(installed)]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_autocast_does_not_round_the_ops_of_the_plain_backends(backend):
    """Inside a bf16 autocast the retrieval scores stay fp32 and exact, and mixing computes as without it."""
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(64, 2, 16, generator=g), torch.randn(1, 2, 32, 8, generator=g)
    want_s, want_i = ops.product_key_topk(q, keys, 6, backend=backend)
    x, down, up = torch.randn(64, 8, generator=g), torch.randn(1024, 8, generator=g), torch.randn(1024, 8, generator=g)
    want_y = ops.expert_mix(x, down, up, want_i, want_s.softmax(-1), backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_s, got_i = ops.product_key_topk(q, keys, 6, backend=backend)
        got_y = ops.expert_mix(x, down, up, got_i, got_s.softmax(-1), backend=backend)
    assert got_s.dtype == torch.float32 and torch.equal(got_i, want_i)
    torch.testing.assert_close(got_s, want_s)
    if backend == "reference":  # the spec computes in fp32 whatever autocast says
        torch.testing.assert_close(got_y, want_y)


def test_ops_import_and_run_without_triton():
    """torchpeer.ops imports no Triton module until the triton backend runs: a CPU-only install works."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import triton fails and find_spec says None
        "import torch, torchpeer, torchpeer.ops as ops\n"
        "s, i = ops.product_key_topk(torch.randn(3, 1, 4), torch.randn(1, 2, 4, 2), 2)\n"
        "kernels = sorted(m for m in sys.modules if m.startswith('torchpeer') and 'triton' in m)\n"
        "print(ops.resolve_backend('expert_mix', 'auto', 'cuda'), kernels)\n"
        "try:\n    ops.resolve_backend('expert_mix', 'triton', 'cuda')\nexcept ValueError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "torch []"
    assert "pip install triton" in lines[1]
