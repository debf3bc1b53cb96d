"""Test references and helpers shared across the test folders (one module, imported as tests.references).

The library's own specs are torchpeer.ops.product_key_topk_reference and
torchpeer.ops.expert_mix_reference; what is here is what tests need on top of them: a loop formula
of expert mixing written independently of every implementation (so the spec itself is tested),
a relative error, and a measure of what autograd keeps for backward.
"""

import torch


def naive_float64(x, down, up, idx, gates, activation):
    """Expert mixing as a loop over (head, k) in float64, independent of the implementations.

    x: (T, d); down, up: (N, d); idx, gates: (T, H, K) -> (T, d) float64.
    """
    act = torch.nn.functional.gelu if activation == "gelu" else torch.relu
    x, down, up, gates = (t.double() for t in (x, down, up, gates))
    out = torch.zeros_like(x)
    for h in range(idx.shape[1]):
        for k in range(idx.shape[2]):
            i = idx[:, h, k]
            out = out + gates[:, h, k, None] * act((x * down[i]).sum(-1, keepdim=True)) * up[i]
    return out


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64 on the CPU."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return ((a - ref).norm() / ref.norm()).item()


def saved_bytes(fn, params):
    """Bytes of tensors autograd keeps for backward while fn() runs, excluding the `params` themselves."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    total = 0

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in param_ptrs:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
