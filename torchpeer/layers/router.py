"""The product-key router shared by PEER and PKM: query network + query norm + sub-keys + exact top-k.

Per token x (d_model,) and head h:

    q_h = norm(W_q x)_h                                  (heads, d_key), norm from build_query_norm
    key_i = [C_s[a] ; C'_s[b]],  i = a * n_keys + b      N = n_keys**2 product keys, s = key set of h
    scores_h, indices_h = exact top_k over i of q_h . key_i       (torchpeer.ops.product_key_topk)

The key sets are shared by all heads (``key_sets=1``, PEER's default) or one per head
(``key_sets=heads``, PKM). With ``key_norm`` (Memory Layers at Scale's key side of query/key
normalisation) every sub-key row C_s[a] is normalised before scoring (``normalize_sub_keys``);
retrieval is the exact top-k over the normalised keys, on every backend. Retrieval goes through
the ops dispatcher with the router's ``backend`` ("auto" | "torch" | "triton" | "reference"); the
dispatcher alone decides what "auto" means and refuses a requested backend that cannot run.

Precision: under autocast the normalised queries (BatchNorm/LayerNorm return fp32 there) are cast
to the autocast dtype and the (small) key tables follow them, so the Triton kernel takes its
tensor-core path; scores are still accumulated and returned in fp32, and the layer mixes with
exactly the indices retrieved here.

``RoutedLayer`` is the mixin of the layers that own a router as ``self.router``: the old attribute
names (``query_proj``, ``norm``, ``sub_keys``, ``query()``) and the old state-dict keys (from before
the router was a module of its own) keep working.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from torchpeer.layers.accounting import FFWCost, count_params, matmul_flops
from torchpeer.layers.query_norm import build_query_norm
from torchpeer.layers.validators import check_choice, check_input, check_number, check_positive
from torchpeer.ops import BACKENDS, RetrievalKernelConfig, product_key_topk, resolve_backend

KEY_NORMS = ("none", "l2", "layer")
MOMENTUM_NORMS = ("batch", "ema", "ema_white")  # the query norms with running statistics


def normalize_sub_keys(sub_keys: torch.Tensor, kind: str, d_key: int) -> torch.Tensor:
    """The sub-keys retrieval scores with: (S, 2, n, m) -> (S, 2, n, m), m = d_key // 2.

    kind "none": ``sub_keys`` itself (the same tensor object: the paper's router, bit for bit).
    "l2": each row scaled to norm sqrt(m / d_key). "layer": each row standardised (mean 0,
    variance 1 over its m entries, no affine), then divided by sqrt(d_key), which is norm
    sqrt(m / d_key) too. Why that norm: it is the expected norm of a random N(0, 1/d_key) row, so
    a unit-variance query scores the normalised keys on the scale it scored the random init with,
    and the softmax gates start as sharp as without normalisation. What normalisation changes: a
    sub-key can no longer win the top-k by growing its norm (only its direction learns); the score
    scale, and so the gates' temperature, is then set by the queries alone (the query norm's
    affine parameters can still sharpen it). Computed in float32 at least (autocast off): the
    rows are few (S * 2 * n), and the normalised keys then follow the router's cast to the query
    dtype like the raw ones. Differentiable (autograd through the normalisation).
    """
    if kind == "none":
        return sub_keys
    m = sub_keys.shape[-1]
    with torch.autocast(sub_keys.device.type, enabled=False):
        k = sub_keys.to(torch.promote_types(sub_keys.dtype, torch.float32))
        if kind == "l2":
            out = F.normalize(k, dim=-1, eps=1e-12) * math.sqrt(m / d_key)
        elif kind == "layer":
            out = F.layer_norm(k, (m,), eps=1e-5) / math.sqrt(d_key)
        else:
            check_choice("key_norm", kind, KEY_NORMS)
    return out.to(sub_keys.dtype)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes in on ``device``'s type, or None when autocast is off."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class ProductKeyRouter(nn.Module):
    """Exact top-k retrieval over n_keys**2 product keys. x: (T, d_model) -> queries, scores, indices.

    Args:
        d_model: input width.
        n_keys: sub-keys per half and key set; there are n_keys**2 keys (experts / memories).
        heads: query heads H.
        top_k: keys retrieved per head, at most n_keys.
        d_key: query / full key width, even (two sub-keys of d_key // 2).
        query_norm: a ``build_query_norm`` kind ("batch", "layer", "none", ...).
        query_norm_momentum: None (the norm's default) or its running statistics' rate in (0, 1]
            (``MOMENTUM_NORMS`` only).
        key_sets: 1 (all heads share the sub-keys) or heads (one set per head).
        query_bias: bias in the query projection (PKM: True, PEER: False).
        backend: retrieval backend for ``torchpeer.ops.product_key_topk``.
        key_norm: "none" (default: raw sub-keys), "l2" or "layer": each sub-key row normalised
            before scoring (``normalize_sub_keys``); the parameter ``sub_keys`` stays raw.

    Initialisation: sub-keys ~ N(0, 1/d_key), so a unit-variance (normalised) query scores each
    full key with about unit variance; the projection uses nn.Linear's default.

    Attributes: ``query_proj`` Linear(d_model, H * d_key), ``norm`` (T, H, d_key) -> same,
    ``sub_keys`` (key_sets, 2, n_keys, d_key // 2).
    """

    def __init__(
        self,
        d_model: int,
        n_keys: int,
        heads: int,
        top_k: int,
        d_key: int,
        query_norm: str = "batch",
        key_sets: int = 1,
        query_bias: bool = False,
        backend: str = "auto",
        key_norm: str = "none",
        query_norm_momentum: float | None = None,
    ):
        super().__init__()
        check_positive(d_model=d_model, n_keys=n_keys, heads=heads, top_k=top_k, d_key=d_key)
        if d_key % 2:
            raise ValueError(f"d_key must be even (two sub-keys of d_key // 2), got {d_key}")
        if top_k > n_keys:
            raise ValueError(
                f"top_k={top_k} must be <= n_keys={n_keys} (sub-keys per half, the product-key retrieval "
                "limit); lower top_k or use more keys"
            )
        if key_sets not in (1, heads):
            raise ValueError(f"key_sets must be 1 (shared) or heads={heads}, got {key_sets}")
        check_choice("backend", backend, BACKENDS)
        check_choice("key_norm", key_norm, KEY_NORMS)
        self.key_norm = key_norm
        self.d_model, self.n_keys, self.heads, self.top_k, self.d_key = d_model, n_keys, heads, top_k, d_key
        self.query_norm, self.key_sets, self.backend = query_norm, key_sets, backend
        self.n_experts = n_keys * n_keys
        # Triton retrieval algorithm and tuning (None: the defaults, e.g. the small-token "split" forward
        # for decode steps); a plain attribute, not saved: benchmarks and tests set it.
        self.retrieval_config: RetrievalKernelConfig | None = None

        self.query_proj = nn.Linear(d_model, heads * d_key, bias=query_bias)
        # the "ema" norm has fused kernels: it follows the router's backend ("torch": no Triton anywhere)
        norm_opts = {"backend": backend} if query_norm == "ema" else {}
        if query_norm_momentum is not None:
            if query_norm not in MOMENTUM_NORMS:
                raise ValueError(
                    f"query_norm_momentum applies to the query norms with running statistics {MOMENTUM_NORMS}, "
                    f"not {query_norm!r}: leave it unset"
                )
            check_number("query_norm_momentum", query_norm_momentum, strict=True, maximum=1.0)
            norm_opts["momentum"] = float(query_norm_momentum)
        self.norm = build_query_norm(query_norm, heads, d_key, **norm_opts)
        self.sub_keys = nn.Parameter(torch.randn(key_sets, 2, n_keys, d_key // 2) / math.sqrt(d_key))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised queries. x: (..., d_model) -> (..., heads, d_key)."""
        check_input(x, self.d_model, type(self).__name__, self.query_proj.weight.dtype)
        lead = x.shape[:-1]
        q = self.query_proj(x.reshape(-1, self.d_model)).view(-1, self.heads, self.d_key)  # (T, H, d_key)
        return self.norm(q).view(*lead, self.heads, self.d_key)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (T, d_model) -> (queries (T, H, d_key) as retrieved with, scores (T, H, top_k) fp32,
        indices (T, H, top_k) int64 in [0, n_keys**2), best first)."""
        q = self.query(x)
        compute = autocast_dtype(q.device)
        if compute is not None:
            q = q.to(compute)  # see the module docstring (precision)
        # Gradients flow to the fp32 sub-keys through the cast (and the normalisation, if any).
        keys = self.retrieval_keys()
        keys = keys if q.dtype == keys.dtype else keys.to(q.dtype)
        scores, indices = product_key_topk(q, keys, self.top_k, backend=self.backend, config=self.retrieval_config)
        return q, scores, indices

    def retrieval_keys(self) -> torch.Tensor:
        """The sub-keys as retrieval scores them, (key_sets, 2, n_keys, d_key // 2): ``sub_keys``
        itself, or its rows normalised (``key_norm``). Anything that re-scores sub-keys (the balance
        term) must use these."""
        return normalize_sub_keys(self.sub_keys, self.key_norm, self.d_key)

    def retrieval_backend(self, device: torch.device | str | None = None) -> str:
        """The backend retrieval resolves to on ``device`` (default: where the sub-keys live)."""
        return resolve_backend("product_key_topk", self.backend, device or self.sub_keys.device)

    def cost(self) -> FFWCost:
        """Per token: the query projection 2*d*H*d_key and every sub-key score, 2*H*n_keys*d_key
        (both halves); active parameters: the query network and all sub-keys (each is scored)."""
        d, H, dk, n = self.d_model, self.heads, self.d_key, self.n_keys
        flops = matmul_flops(1, d, H * dk) + H * 2 * matmul_flops(1, dk // 2, n)
        active = count_params(self.query_proj) + count_params(self.norm) + self.sub_keys.numel()
        return FFWCost(total_params=count_params(self), active_params=active, forward_flops=flops)

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """Sub-keys and the query norm's parameters are not weight-decayed."""
        return {"expert": [], "no_decay": [self.sub_keys, *self.norm.parameters()]}

    def extra_repr(self) -> str:
        return (
            f"n_keys={self.n_keys} (N={self.n_experts}), heads={self.heads}, top_k={self.top_k}, "
            f"d_key={self.d_key}, query_norm={self.query_norm}, key_sets={self.key_sets}, backend={self.backend}"
            + (f", key_norm={self.key_norm}" if self.key_norm != "none" else "")
        )


# Parameters that lived directly on PEER / PKM before the router was a module: <prefix><name>... is now
# <prefix>router.<name>... (checkpoints written by the old code keep loading).
_LEGACY_ROUTER_NAMES = ("query_proj", "norm", "sub_keys")


@contextlib.contextmanager
def norm_statistics_kept(norm: nn.Module):
    """Within: the query norm's buffers (running statistics, update counts) are stand-in copies, so
    that looking at queries or experts (``query()``, ``retrieve()``) in training mode is not a training
    step: a call before ``forward`` sees what the forward will, and the forward is the one that counts.
    The originals are never written, so nothing autograd saved from them is modified in place."""
    originals = [(mod, dict(mod._buffers)) for mod in norm.modules()]
    for mod, bufs in originals:
        for name, buf in bufs.items():
            if buf is not None:
                mod._buffers[name] = buf.clone()
    try:
        yield
    finally:
        for mod, bufs in originals:
            mod._buffers.update(bufs)


class RoutedLayer:
    """Mixin for an nn.Module that owns ``self.router: ProductKeyRouter``."""

    router: ProductKeyRouter

    @property
    def query_proj(self) -> nn.Linear:
        return self.router.query_proj

    @property
    def norm(self) -> nn.Module:
        return self.router.norm

    @property
    def sub_keys(self) -> nn.Parameter:
        return self.router.sub_keys

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised queries. x: (..., d_model) -> (..., heads, d_key). Leaves the query norm's
        running statistics as they were (in training mode, only ``forward`` updates them)."""
        with norm_statistics_kept(self.router.norm):
            return self.router.query(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in list(state_dict):
            rest = key[len(prefix) :]
            if key.startswith(prefix) and rest.split(".", 1)[0] in _LEGACY_ROUTER_NAMES:
                state_dict.setdefault(f"{prefix}router.{rest}", state_dict.pop(key))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
