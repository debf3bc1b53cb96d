"""The spec of the causal-safe (``ema``) query norm in plain PyTorch, and its CPU path.

Per feature f of x (T, F): the *value* is normalised with the running statistics of earlier
steps only, y = weight * (x - mu_run) / sqrt(var_run + eps) + bias, in train and eval mode alike.
In train mode with T > 1 the running statistics are then updated from this batch (biased-corrected
EMA: rate max(momentum, 1 / (num_updates + 1)); the variance lerped towards is the unbiased one),
and the *gradient* is BatchNorm's (bn_grad): through y_bn = (x - b_mu) / sqrt(b_var + eps) * ratio
with ratio = sqrt((b_var + eps) / (var_run + eps)) detached, i.e. in closed form, g = dL/dy * weight,

    dx = (g - mean_t(g) - xhat_b * mean_t(g * xhat_b)) / sqrt(var_run + eps),   xhat_b = (x - b_mu) / sqrt(b_var + eps),

while dweight = sum_t dL/dy * (x - mu_run) / sqrt(var_run + eps) and dbias = sum_t dL/dy use the
value. Eval mode, T = 1 or bn_grad=False: dx = g / sqrt(var_run + eps). Statistics in at least fp32.
"""

from __future__ import annotations

import torch

from .checks import check_ema_norm_inputs


def stats_dtype(buffer: torch.Tensor) -> torch.dtype:
    """At least fp32, whatever the buffers' dtype (float64 buffers: float64)."""
    return torch.promote_types(buffer.dtype, torch.float32)


def update_rate(num_updates: torch.Tensor, momentum: float) -> torch.Tensor:
    """max(momentum, 1 / (n + 1)) as a tensor: no .item() host sync, no graph break under torch.compile."""
    return (1.0 / (num_updates + 1).float()).clamp(min=momentum)


def ema_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_updates: torch.Tensor,
    eps: float,
    momentum: float,
    training: bool,
    bn_grad: bool = True,
) -> torch.Tensor:
    """x: (T, F) -> y (T, F) in x's dtype; in training with T > 1 updates running_mean, running_var
    and num_updates in place (see the module docstring). Differentiable w.r.t. x, weight and bias."""
    check_ema_norm_inputs(x, weight, bias, running_mean, running_var, num_updates, eps, momentum)
    cdt = stats_dtype(running_mean)
    out_dtype = x.dtype
    x = x.to(cdt)
    # Copies: the running buffers are updated in place below, and a compiled graph (inductor)
    # would otherwise save the buffer itself for backward and see it modified.
    mu, var = running_mean.to(cdt, copy=True), running_var.to(cdt, copy=True)
    y = (x - mu) * torch.rsqrt(var + eps)
    if training and x.shape[0] > 1:
        b_mu = x.mean(0)
        b_var = x.var(0, unbiased=False)
        if bn_grad:
            # BatchNorm's gradient, zero value: (x - b_mu)/b_sd * (b_sd/sd), with the ratio detached.
            ratio = torch.sqrt((b_var + eps) / (var + eps)).detach()
            y_bn = (x - b_mu) * torch.rsqrt(b_var + eps) * ratio
            y = y.detach() + (y_bn - y_bn.detach()) if x.requires_grad else y
        with torch.no_grad():
            r = update_rate(num_updates, momentum)
            unbiased = b_var.detach() * x.shape[0] / (x.shape[0] - 1)
            running_mean.lerp_(b_mu.detach().to(running_mean.dtype), r.to(running_mean.dtype))
            running_var.lerp_(unbiased.to(running_var.dtype), r.to(running_var.dtype))
            num_updates += 1
    y = y * weight.to(cdt) + bias.to(cdt)
    return y.to(out_dtype)
