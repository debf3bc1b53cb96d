"""The custom ops of the sharded Triton mixing (torchpeer/parallel/triton_mixing.py) and of the token
gather (collectives.py), with a one-rank ShardContext (no process group needed: one rank calls no
collective): torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) and
the input errors. Their results on 2 and 4 ranks: test_sharded_triton.py."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from torchpeer.optim.rowwise_adam import RowwiseAdamState  # noqa: E402
from torchpeer.parallel import collectives  # noqa: E402
from torchpeer.parallel import triton_mixing as tm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tensors(T=5, d=8, N=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen).to(DEVICE)
    down, up = (torch.randn(N, d, generator=gen).to(DEVICE) for _ in range(2))
    idx = torch.randint(0, N, (T, 2, 3), generator=gen).to(DEVICE)
    gates = torch.rand(T, 2, 3, generator=gen).to(DEVICE)
    return x, down, up, idx, gates, torch.randn(T, d, generator=gen).to(DEVICE)


def test_opcheck_sharded_mixing_ops():
    ctx = collectives.ShardContext(None, 0, 1)
    x, down, up, idx, gates, dy = tensors()
    X = x.clone()
    leaves = [t.clone().requires_grad_() for t in (x, down, up, gates)]
    torch.library.opcheck(tm._sharded_mix_fwd, (leaves[0], X, leaves[1], leaves[2], idx, leaves[3], "gelu", ctx.key))
    _, h = tm._sharded_mix_fwd(x, X, down, up, idx, gates, "gelu", ctx.key)
    torch.library.opcheck(tm._sharded_mix_bwd, (dy, X, down, up, idx, gates, h, "relu", ctx.key))
    hyper = torch.tensor([1e-2, 0.9, 0.99, 1e-8, 0.0], device=DEVICE)
    for elementwise in (False, True):  # second moments (N,) and (N, d/W)
        states = []
        for _ in range(2):
            s = RowwiseAdamState.zeros_like(down, elementwise=elementwise)
            states += [torch.empty(0, device=DEVICE), s.exp_avg, s.exp_avg_sq, s.steps]
        args = (dy, X, [down.clone(), up.clone(), *states], idx, gates, h, hyper, "gelu", ctx.key)
        torch.library.opcheck(tm._sharded_mix_bwd_rowwise_adam, args)
    torch.library.opcheck(collectives._gather_tokens_op, (x.clone().requires_grad_(), ctx.key))


def test_bad_inputs_raise_clear_errors():
    ctx = collectives.ShardContext(None, 0, 1)
    x, down, up, idx, gates, _ = tensors()
    with pytest.raises(ValueError, match="do not make d_model"):
        tm.sharded_mix_triton(x, x, down[:, :4], up[:, :4], idx, gates, "gelu", ctx)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        tm.sharded_mix_triton(x.double(), x.double(), down.double(), up.double(), idx, gates, "gelu", ctx)
    st = [RowwiseAdamState.zeros_like(t) for t in (down, up)]
    hyper = torch.zeros(5, device=DEVICE)
    with pytest.raises(ValueError, match="not require grad"):
        tm.sharded_mix_rowwise_adam(x, x, down.requires_grad_(), up, idx, gates, "gelu", ctx, *st, hyper)
    with pytest.raises(ValueError, match="hyper must be"):
        tm.sharded_mix_rowwise_adam(x, x, down.detach(), up, idx, gates, "gelu", ctx, *st, hyper[:4])
    mixed = (st[0], RowwiseAdamState.zeros_like(up, elementwise=True))
    with pytest.raises(ValueError, match="both tables or neither keep element-wise"):
        tm.sharded_mix_rowwise_adam(x, x, down.detach(), up, idx, gates, "gelu", ctx, *mixed, hyper)
