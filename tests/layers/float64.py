"""float64 activations and a gradient check shared by the FFW layer tests (dense, MoE, PKM)."""

import math

import torch


def gelu64(h):
    return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))


def silu64(h):
    return h * torch.sigmoid(h)


def relu64(h):
    return h.clamp_min(0)


ACT64 = {"gelu": gelu64, "silu": silu64, "relu": relu64}


def assert_grads(module, loss):
    loss.backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
