"""Query normalisations for product-key routers (PEER, PKM).

Every module built here maps queries q: (T, heads, d_key) -> (T, heads, d_key), T the flattened
tokens of the call. ``build_query_norm(kind, heads, d_key, **opts)`` picks one:

* ``"batch"``: BatchNorm1d over the heads*d_key features (the PEER paper, Lample et al.'s PKM).
  At train time it normalises with the statistics of the *whole batch*, so in a causal LM the
  query at position t depends on later positions of the batch (evaluation uses running statistics).
  State-dict keys are those of ``nn.BatchNorm1d`` (old checkpoints keep loading).
* ``"layer"``: LayerNorm over each head's d_key features (causal-safe: per token).
* ``"none"``: identity.
* ``"ema"``: causal-safe batch normalisation. The *value* is normalised with running (EMA)
  mean/variance from earlier steps only, in train and eval mode alike; the running statistics are
  updated after the forward from the batch. The *gradient* is BatchNorm's (it flows through the
  batch statistics, as in batch renormalisation with unclipped r, d), so the query network is
  still pushed towards spread, centred features. The value never depends on other positions of
  the current batch.
* ``"ema_white"``: causal-safe whitening of each query half (two d_key/2 halves per head, the
  units a product key scores). Running mean and covariance (EMA) give W = C^{-1/2} (ZCA); the value
  is (q - mu) W with W and mu from earlier steps, then a learned per-feature scale and shift. Why:
  trained queries are anisotropic (effective rank ~15 of 64 per half), and a per-feature variance
  norm does not decorrelate them. The gradient is BN-style (see ``"ema"``) on top of the fixed W.
* ``"l2"``: each query half L2-normalised to the norm it would have with unit-variance features
  (sqrt(d_key/2)), times a learned scale per head (a temperature); per token, causal-safe.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchpeer.layers.validators import check_choice, check_number
from torchpeer.ops import BACKENDS, resolve_backend
from torchpeer.ops.query_norm import ema_norm_reference, kernel_supports

QUERY_NORM_KINDS = ("batch", "layer", "none", "ema", "ema_white", "l2")


def _check_q(q: torch.Tensor, heads: int, d_key: int) -> None:
    if q.dim() != 3 or q.shape[1] != heads or q.shape[2] != d_key:
        raise ValueError(f"expected queries (T, heads={heads}, d_key={d_key}), got shape {tuple(q.shape)}")


class BatchQueryNorm(nn.BatchNorm1d):
    """BatchNorm1d over the heads*d_key query features. q: (T, heads, d_key) -> same shape."""

    def __init__(self, heads: int, d_key: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__(heads * d_key, eps=eps, momentum=momentum)
        self.heads, self.d_key = heads, d_key

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        _check_q(q, self.heads, self.d_key)
        return super().forward(q.reshape(q.shape[0], self.num_features)).view_as(q)  # (not -1: 0 tokens)


class LayerQueryNorm(nn.LayerNorm):
    """LayerNorm over each head's d_key features. q: (T, heads, d_key) -> same shape."""

    def __init__(self, heads: int, d_key: int, eps: float = 1e-5):
        super().__init__(d_key, eps=eps)
        self.heads, self.d_key = heads, d_key

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        _check_q(q, self.heads, self.d_key)
        return super().forward(q)


class NoQueryNorm(nn.Identity):
    """Identity (keeps the raw projected queries)."""

    def __init__(self, heads: int, d_key: int):
        super().__init__()
        self.heads, self.d_key = heads, d_key


class _EMAStats(nn.Module):
    """Running statistics with a bias-corrected EMA: the first update takes the batch's statistics
    in full (momentum 1), the n-th update momentum max(momentum, 1/n), so early queries are not
    normalised with the arbitrary initial values for long."""

    def __init__(self, momentum: float):
        super().__init__()
        check_number("momentum", momentum, strict=True, maximum=1.0)
        self.momentum = momentum
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def _rate(self) -> torch.Tensor:
        # A tensor, not a Python float: no .item() host sync, and no graph break under torch.compile
        # between reading the running statistics and updating them (a break there leaves the compiled
        # graph holding buffers that eager code then modifies in place).
        return (1.0 / (self.num_updates + 1).float()).clamp(min=self.momentum)

    def _stats_dtype(self, buffer: torch.Tensor) -> torch.dtype:
        """Statistics are computed in at least fp32, whatever the module's dtype: a bf16 module keeps
        bf16 buffers (``.to(bf16)`` casts them) but its moments are accumulated in fp32; a float64
        module computes in float64 (the float64 reference tests)."""
        return torch.promote_types(buffer.dtype, torch.float32)


class EMAQueryNorm(_EMAStats):
    """Causal-safe batch norm: value from running statistics, gradient as BatchNorm's.

    q: (T, heads, d_key) -> same shape. Per feature f (heads*d_key of them):
    y = gamma * (q - mu_run) / sqrt(var_run + eps) + beta, with mu_run/var_run from earlier steps.
    In train mode the result carries BatchNorm's gradient (through the batch mean/variance); the
    math, and the CPU path, is torchpeer.ops.query_norm.ema_norm_reference. ``backend`` ("auto",
    "torch", "triton", "reference"; resolved by torchpeer.ops.dispatch): "auto" runs the fused Triton
    kernels on CUDA (torchpeer/ops/query_norm: one launch for the value, this batch's statistics
    and the running-statistics update, two for the BatchNorm-style backward; one autograd
    Function, no host sync); float64 modules and the CPU run the reference.
    """

    def __init__(
        self,
        heads: int,
        d_key: int,
        eps: float = 1e-5,
        momentum: float = 0.05,
        bn_grad: bool = True,
        backend: str = "auto",
    ):
        super().__init__(momentum)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
        self.heads, self.d_key, self.eps, self.bn_grad, self.backend = heads, d_key, eps, bn_grad, backend
        f = heads * d_key
        self.weight = nn.Parameter(torch.ones(f))
        self.bias = nn.Parameter(torch.zeros(f))
        self.register_buffer("running_mean", torch.zeros(f))
        self.register_buffer("running_var", torch.ones(f))

    def uses_kernels(self, x: torch.Tensor) -> bool:
        """Does a forward on x (T, F) run the fused Triton kernels?"""
        if resolve_backend("ema_query_norm", self.backend, x.device) != "triton":
            return False
        return kernel_supports(x, self.weight, self.bias, self.running_mean, self.running_var)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        _check_q(q, self.heads, self.d_key)
        x = q.reshape(q.shape[0], self.heads * self.d_key)  # (not -1: a batch of 0 tokens has no -1)
        args = (x, self.weight, self.bias, self.running_mean, self.running_var, self.num_updates)
        opts = (self.eps, self.momentum, self.training, self.bn_grad)
        if self.uses_kernels(x):
            # No autocast region here: the kernels compute in fp32 whatever autocast says, and
            # entering one costs host time on every step.
            from torchpeer.ops.query_norm.triton_op import ema_norm_triton

            return ema_norm_triton(*args, *opts).view_as(q)
        with torch.autocast(q.device.type, enabled=False):  # statistics in fp32
            return ema_norm_reference(*args, *opts).view_as(q)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, d_key={self.d_key}, momentum={self.momentum}, backend={self.backend}"


class EMAWhitenQueryNorm(_EMAStats):
    """Causal-safe ZCA whitening of each query half with running mean/covariance.

    q: (T, heads, d_key) -> same shape. Groups g = (head, half), each of width m = d_key // 2:
    y_g = ((q_g - mu_g) W_g) * gamma + beta, W_g = C_g^{-1/2} (eps added to the eigenvalues),
    recomputed from the running covariance every ``refresh`` updates (an eigh of (2*heads, m, m)).
    In train mode the value uses mu, W from earlier steps; BN-style gradient through the batch
    mean of the whitened features (``bn_grad``) keeps the query net centred.
    """

    _eager_forward = None  # _forward wrapped by torch.compiler.disable, made on first use

    def __init__(self, heads: int, d_key: int, eps: float = 1e-3, momentum: float = 0.05, refresh: int = 10):
        super().__init__(momentum)
        if d_key % 2:
            raise ValueError(f"d_key={d_key} must be even (two halves are whitened separately)")
        if refresh < 1:
            raise ValueError(f"refresh must be >= 1, got {refresh}")
        self.heads, self.d_key, self.eps, self.refresh = heads, d_key, eps, refresh
        g, m = 2 * heads, d_key // 2
        self.weight = nn.Parameter(torch.ones(heads, d_key))
        self.bias = nn.Parameter(torch.zeros(heads, d_key))
        self.register_buffer("running_mean", torch.zeros(g, m))
        self.register_buffer("running_cov", torch.eye(m).repeat(g, 1, 1))
        self.register_buffer("whitener", torch.eye(m).repeat(g, 1, 1))

    @torch.no_grad()
    def _refresh_whitener(self) -> None:
        cov = self.running_cov.double()
        evals, evecs = torch.linalg.eigh(cov)
        scale = torch.rsqrt(evals.clamp_min(0) + self.eps * evals.mean(-1, keepdim=True).clamp_min(1e-12))
        self.whitener.copy_(((evecs * scale.unsqueeze(-2)) @ evecs.transpose(-1, -2)).to(self.whitener.dtype))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        _check_q(q, self.heads, self.d_key)
        cls = type(self)
        if cls._eager_forward is None:
            # Eager under torch.compile: the whitener refresh (an eigh every ``refresh`` updates, decided
            # on the host) rewrites buffers in place that a compiled graph would have saved for its
            # backward. Wrapped on first use, not at import: torch.compiler.disable loads torch._dynamo.
            cls._eager_forward = torch.compiler.disable(cls._forward)
        with torch.autocast(q.device.type, enabled=False):  # statistics and whitening in fp32
            return cls._eager_forward(self, q)

    def _forward(self, q: torch.Tensor) -> torch.Tensor:
        T, g, m = q.shape[0], 2 * self.heads, self.d_key // 2
        cdt = self._stats_dtype(self.running_mean)
        x = q.to(cdt).reshape(T, g, m)
        # Copies: the update and refresh below change the buffers in place; autograd keeps these.
        w = self.whitener.to(cdt, copy=True)
        mu = self.running_mean.to(cdt, copy=True)
        y = torch.einsum("tgi,gij->tgj", x - mu, w)
        if self.training and T > 1:
            b_mu = x.mean(0)
            if x.requires_grad:
                # Gradient of centring with the batch mean (value exactly zero added).
                xc = torch.einsum("tgi,gij->tgj", x - b_mu, w)
                y = y.detach() + (xc - xc.detach())
            with torch.no_grad():
                xd = x.detach() - b_mu.detach()
                b_cov = torch.einsum("tgi,tgj->gij", xd, xd) / (T - 1)
                r = self._rate()
                self.running_mean.lerp_(b_mu.detach().to(self.running_mean.dtype), r.to(self.running_mean.dtype))
                self.running_cov.lerp_(b_cov.to(self.running_cov.dtype), r.to(self.running_cov.dtype))
                self.num_updates += 1
                n = int(self.num_updates.item())  # one host sync per step, not two
                if n % self.refresh == 0 or n <= 1:
                    self._refresh_whitener()
        y = y.reshape(T, self.heads, self.d_key) * self.weight.to(cdt) + self.bias.to(cdt)
        return y.to(q.dtype)


class L2QueryNorm(nn.Module):
    """Per-half L2 normalisation with a learned per-head scale (temperature).

    q: (T, heads, d_key) -> same shape; each half is rescaled to norm sqrt(d_key/2) * scale_h, the
    norm a unit-variance feature vector would have, so sub-keys ~ N(0, 1/d_key) score it with
    about the same spread as BatchNorm'd queries at init.
    """

    def __init__(self, heads: int, d_key: int, eps: float = 1e-6, init_scale: float = 1.0):
        super().__init__()
        if d_key % 2:
            raise ValueError(f"d_key={d_key} must be even (two halves are normalised separately)")
        self.heads, self.d_key, self.eps = heads, d_key, eps
        self.scale = nn.Parameter(torch.full((heads, 1, 1), float(init_scale)))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        _check_q(q, self.heads, self.d_key)
        T, m = q.shape[0], self.d_key // 2
        x = q.to(torch.promote_types(q.dtype, torch.float32)).reshape(T, self.heads, 2, m)
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + self.eps) * (math.sqrt(m) * self.scale)
        return x.reshape(T, self.heads, self.d_key).to(q.dtype)


_BUILDERS = {
    "batch": BatchQueryNorm,
    "layer": LayerQueryNorm,
    "none": NoQueryNorm,
    "ema": EMAQueryNorm,
    "ema_white": EMAWhitenQueryNorm,
    "l2": L2QueryNorm,
}


def build_query_norm(kind: str, heads: int, d_key: int, **opts) -> nn.Module:
    """Query normalisation module ``(T, heads, d_key) -> (T, heads, d_key)``.

    kind: one of ``QUERY_NORM_KINDS`` (see the module docstring); opts go to the module
    (e.g. ``momentum``, ``eps``). Raises ValueError for an unknown kind or bad sizes.
    """
    if kind not in _BUILDERS:
        check_choice("query_norm", kind, QUERY_NORM_KINDS)
    for name, v in (("heads", heads), ("d_key", d_key)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    try:
        return _BUILDERS[kind](heads, d_key, **opts)
    except TypeError as e:
        raise ValueError(f"bad options {sorted(opts)} for query_norm {kind!r}: {e}") from None
