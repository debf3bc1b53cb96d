"""Decoder-only transformer LM whose FFW layers are chosen by config (any registered FFW kind:
dense | peer | pkm | moe | ..., see torchpeer/layers/registry.py).

Pre-norm blocks: x = x + attn(rmsnorm(x)); x = x + ffw(rmsnorm(x)). Attention is causal
multi-head with rotary position embeddings (RoPE) through ``F.scaled_dot_product_attention``.
The block FFWs follow ``ModelConfig.block_kinds()``: the sparse kind at the placed blocks
(0-based indices; "middle" = block n_layers // 2, "all", or a list), dense elsewhere. A kind may
share one module between its layers (``build_shared`` in the registry; PEER's ``shared_pool``):
the LM builds it once as ``ffw_shared`` and passes it to every layer of that kind.

Shapes: idx (B, T) int64 token ids -> logits (B, T, vocab_size).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from torchpeer.layers.registry import get_ffw, sum_aux_losses
from torchpeer.lm.chunked_loss import chunked_linear_cross_entropy
from torchpeer.lm.config import ModelConfig


def build_ffw(kind: str, cfg: ModelConfig, shared: nn.Module | None = None) -> nn.Module:
    """The FFW module of one block: registered kind ``kind`` built from its config section
    ``cfg.<kind>`` (see ``torchpeer.layers.registry``); ``shared``: the kind's shared module."""
    ffw = get_ffw(kind)
    section = getattr(cfg, ffw.name)
    return ffw.build(cfg.d_model, section) if shared is None else ffw.build(cfg.d_model, section, shared)


@contextlib.contextmanager
def ffw_section_errors(kind: str):
    """A ValueError / TypeError of building an FFW of ``kind`` (a non-square n_experts, top_k 0, an
    unknown query_norm: the layer's own message) re-raised naming the config section it came from."""
    try:
        yield
    except (ValueError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"[model.{kind}] {msg}") from e


def check_ffw_sections(cfg: ModelConfig) -> None:
    """Build one FFW of every kind the model uses on the meta device (no memory, no init), so that a
    bad ``[model.<kind>]`` value is one error that names its section before a trainer tokenises
    anything (TransformerLM would raise the same, after the data)."""
    for kind in dict.fromkeys(cfg.block_kinds()):
        with ffw_section_errors(kind), torch.device("meta"):
            build_ffw(kind, cfg, build_shared_ffw(cfg) if kind == cfg.ffw else None)


def build_shared_ffw(cfg: ModelConfig) -> nn.Module | None:
    """The module shared by the layers of the sparse kind ``cfg.ffw`` (e.g. PEER's ExpertPool with
    ``model.peer.shared_pool``), or None: none asked for, or no block uses the kind."""
    ffw = get_ffw(cfg.ffw)
    if ffw.build_shared is None or not cfg.sparse_blocks():
        return None
    return ffw.build_shared(cfg.d_model, getattr(cfg, ffw.name))


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 at least. x: (..., d)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 under autocast: normalise in fp32
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(xf.dtype)).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form) at absolute positions.

    For each pair (x1, x2) = (x[..., :d/2], x[..., d/2:]) and position p, rotate by p * theta_j
    with theta_j = base^(-2j/d).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, x: torch.Tensor, start: int | torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, head_dim) at positions start..start+T-1 -> same shape. ``start``: an int, or
        the positions themselves as a (T,) integer tensor (the static cache: no host value)."""
        T = x.shape[-2]
        dtype = torch.promote_types(x.dtype, torch.float32)
        # Angles in float64 (exact at large positions), computed on the fly: no buffer for .to() to cast.
        f64 = dict(device=x.device, dtype=torch.float64)
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, **f64) / self.head_dim)
        pos = start.to(torch.float64) if isinstance(start, torch.Tensor) else torch.arange(start, start + T, **f64)
        angles = (pos[:, None] * inv_freq[None, :]).to(dtype)  # (T, head_dim/2)
        cos, sin = angles.cos(), angles.sin()
        xf = x.to(dtype)
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return out.to(x.dtype)


class KVCache:
    """Keys and values of every layer for incremental decoding.

    k, v: (n_layers, B, n_heads, max_len, head_dim); ``pos`` = number of cached positions.
    static: positions also in ``pos_t``, a 0-d device tensor, and attention always over all
    ``max_len`` slots with a mask: every step then has the same shapes and no host value, so it can
    be captured in a CUDA graph and replayed (torchpeer/lm/decode_graph.py). The same results as the
    default cache up to the attention kernel's summation order.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32, static=False):
        hd = cfg.d_model // cfg.n_heads
        shape = (cfg.n_layers, batch, cfg.n_heads, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0
        self.pos_t = torch.zeros((), dtype=torch.long, device=device) if static else None

    def advance(self, n: int) -> None:
        self.pos += n
        if self.pos_t is not None:
            self.pos_t += n  # in place: a graph replay advances it on the device


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE. x: (B, T, d_model) -> (B, T, d_model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_model = cfg.n_heads, cfg.d_model
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.rotary = Rotary(self.head_dim, cfg.rope_base)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B,H,T,hd)
        if cache is not None and cache.pos_t is not None:
            return self.proj(self._static_cache_attention(q, k, v, cache, layer).transpose(1, 2).reshape(B, T, -1))
        start = cache.pos if cache is not None else 0
        q, k = self.rotary(q, start), self.rotary(k, start)
        if cache is None or start == 0:
            if cache is not None:
                cache.k[layer, :, :, :T] = k
                cache.v[layer, :, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            end = start + T
            cache.k[layer, :, :, start:end] = k
            cache.v[layer, :, :, start:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
            # Query i (absolute position start+i) sees keys 0..start+i.
            mask = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.d_model))

    def _static_cache_attention(self, q, k, v, cache: KVCache, layer: int) -> torch.Tensor:
        """(B, H, T, hd) -> (B, H, T, hd) at positions pos_t..pos_t+T-1, over all max_len cache slots
        (the unwritten ones masked): fixed shapes, device-side positions."""
        pos = cache.pos_t + torch.arange(q.shape[-2], device=q.device)  # (T,)
        q, k = self.rotary(q, pos), self.rotary(k, pos)
        cache.k[layer].index_copy_(2, pos, k.to(cache.k.dtype))
        cache.v[layer].index_copy_(2, pos, v.to(cache.v.dtype))
        mask = torch.arange(cache.max_len, device=q.device)[None, :] <= pos[:, None]  # (T, max_len)
        return F.scaled_dot_product_attention(q, cache.k[layer].to(q.dtype), cache.v[layer].to(q.dtype), attn_mask=mask)


class Block(nn.Module):
    """Pre-norm transformer block with a configurable FFW."""

    def __init__(self, cfg: ModelConfig, ffw_kind: str, shared: nn.Module | None = None):
        super().__init__()
        self.ffw_kind = ffw_kind
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        with ffw_section_errors(ffw_kind):
            self.ffw = build_ffw(ffw_kind, cfg, shared)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.ffw(self.norm2(x))


class TransformerLM(nn.Module):
    """Decoder-only LM. ``cfg.vocab_size`` must be set (the trainer fills it from the tokenizer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is not set; take it from the tokenizer before building")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # Registered only when built: models without one keep their parameter order and state-dict keys.
        with ffw_section_errors(cfg.ffw):
            shared = build_shared_ffw(cfg)
        if shared is not None:
            self.ffw_shared = shared
        kinds = cfg.block_kinds()
        self.blocks = nn.ModuleList(Block(cfg, k, shared if k == cfg.ffw else None) for k in kinds)
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        # model.logit_prior: a bias on the logits (state-dict key lm_head.bias), zero here; a new run sets
        # it to the train split's log unigram frequencies (torchpeer/lm/logit_prior.py)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=cfg.logit_prior != "none")
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # GPT-2 style for the parts this module owns; the FFW modules keep their own init.
        std = self.cfg.init_std
        nn.init.normal_(self.tok_emb.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        if self.lm_head.bias is not None:
            nn.init.zeros_(self.lm_head.bias)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=std)
            # Residual-branch output scaled down with depth (GPT-2).
            nn.init.normal_(blk.attn.proj.weight, std=std / math.sqrt(2 * self.cfg.n_layers))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        loss_chunk_tokens: int = 0,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) -> (logits (B, T, V) or (B, 1, V) if last_only, mean CE loss or None).

        With ``cache`` the tokens are appended at position ``cache.pos`` and the cache advances.
        loss_chunk_tokens > 0 with targets and gradients on: the head and loss run that many tokens
        at a time (train.loss_chunk_tokens) and the logits returned are None (never made whole).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        x = self.tok_emb(idx)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cache, i)
        if cache is not None:
            cache.advance(idx.shape[1])
        if last_only:
            x = x[:, -1:]
        h = self.norm_f(x)
        if loss_chunk_tokens and targets is not None and torch.is_grad_enabled() and not last_only:
            flat, head = h.reshape(-1, h.shape[-1]), self.lm_head
            loss = chunked_linear_cross_entropy(flat, head.weight, targets.reshape(-1), loss_chunk_tokens, head.bias)
            return None, loss
        logits = self.lm_head(h)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 autocast -> fp32 loss
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the FFWs' ``aux_loss()`` terms of the last forward (already weighted, e.g. the
        token-choice MoE balance loss times its weight); None if no FFW has one."""
        return sum_aux_losses(self)
