"""Parameters and FLOPs of a TransformerLM, per block and in total (``torchpeer info``).

Conventions (on top of ``torchpeer/layers/accounting.py``: multiply-add = 2 FLOPs, training = 3 x forward):

* Attention per block: the q/k/v/out projections are 4 * d_model^2 weights, forward
  2 * 4 * d_model^2 FLOPs per token. The score term (QK^T and AV, 2 * 2 * T * d_model for a
  token attending to T keys) is averaged over causal positions (T/2 keys on average), giving
  2 * seq_len * d_model forward, i.e. 6 * seq_len * d_model training FLOPs per token per layer
  (the Kaplan et al. 2020 convention).
* FFW per block: the module's own ``cost()`` (``FFWCost.train_flops`` for training, with its
  training-only ``aux_train_flops``, e.g. PEER's balance term).
* A module shared by the FFW layers (``TransformerLM.ffw_shared``, e.g. PEER's shared expert
  pool) is a part of its own, counted once: its parameters in the total, none active there (each
  layer counts the rows it reads as its active parameters) and no FLOPs.
* Norms: parameters counted (total and active), FLOPs not (elementwise).
* Embeddings: the input lookup costs no FLOPs and its table is not an *active* parameter (one
  row per token is read); the unembedding (lm_head) matmul is counted: 2 * d_model * vocab
  forward FLOPs and d_model * vocab active parameters. With tied embeddings the shared matrix is
  one set of parameters in the total. The head's bias (model.logit_prior) is vocab parameters,
  total and active; its add is elementwise (no FLOPs).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from torchpeer.layers.accounting import TRAIN_FLOPS_MULTIPLIER, FFWCost, count_params, matmul_flops
from torchpeer.lm.config import ModelConfig


@dataclass(frozen=True)
class PartCost(FFWCost):
    """Cost of one part of the model, per token: an ``FFWCost`` with the part's name and kind."""

    name: str = ""
    kind: str = ""


@dataclass(frozen=True)
class ModelCost:
    """Per-part costs and totals; ``total_params`` counts shared (tied) parameters once."""

    parts: list[PartCost]
    total_params: int

    @property
    def active_params(self) -> int:
        return sum(p.active_params for p in self.parts)

    @property
    def forward_flops(self) -> int:
        return sum(p.forward_flops for p in self.parts)

    @property
    def aux_train_flops(self) -> int:
        return sum(p.aux_train_flops for p in self.parts)

    @property
    def train_flops(self) -> int:
        """Training FLOPs per token."""
        return TRAIN_FLOPS_MULTIPLIER * self.forward_flops + self.aux_train_flops

    def to_dict(self) -> dict:
        return {
            "total_params": self.total_params,
            "active_params": self.active_params,
            "forward_flops_per_token": self.forward_flops,
            "train_flops_per_token": self.train_flops,
            "parts": [
                {
                    "name": p.name,
                    "kind": p.kind,
                    "total_params": p.total_params,
                    "active_params": p.active_params,
                    "forward_flops": p.forward_flops,
                    "train_flops": p.train_flops,
                }
                for p in self.parts
            ],
        }


def attention_cost(d_model: int, seq_len: int) -> FFWCost:
    """Per-token cost of one attention layer (see module docstring)."""
    params = 4 * d_model * d_model
    proj = 4 * matmul_flops(1, d_model, d_model)
    scores = 2 * seq_len * d_model  # (QK^T + AV) = 4 * T * d, times 1/2 for causal
    return FFWCost(params, params, proj + scores)


def model_cost(model) -> ModelCost:
    """Cost of a built ``TransformerLM`` (may live on the meta device)."""
    cfg: ModelConfig = model.cfg
    d, V = cfg.d_model, cfg.vocab_size
    parts = [PartCost(V * d, 0, 0, name="embedding", kind="lookup")]
    shared = getattr(model, "ffw_shared", None)
    if shared is not None:
        parts.append(PartCost(count_params(shared), 0, 0, name="ffw_shared", kind=type(shared).__name__))
    for i, blk in enumerate(model.blocks):
        attn = attention_cost(d, cfg.seq_len)
        norms = count_params(blk.norm1) + count_params(blk.norm2)
        ffw = blk.ffw.cost()
        parts.append(
            PartCost(
                attn.total_params + norms + ffw.total_params,
                attn.active_params + norms + ffw.active_params,
                attn.forward_flops + ffw.forward_flops,
                ffw.aux_train_flops,
                name=f"block {i}",
                kind=blk.ffw_kind,
            )
        )
    head_params = 0 if cfg.tie_embeddings else V * d
    bias = V if model.lm_head.bias is not None else 0  # model.logit_prior; its add is not counted (elementwise)
    head = PartCost(
        d + head_params + bias, d + V * d + bias, matmul_flops(1, d, V), name="final norm + lm_head", kind="unembed"
    )
    parts.append(head)
    return ModelCost(parts, count_params(model))


def config_cost(cfg: ModelConfig) -> ModelCost:
    """Cost of the model a config describes, built on the meta device (no memory, no init)."""
    from torchpeer.lm.model import TransformerLM

    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is not set; resolve it from the tokenizer first")
    with torch.device("meta"):
        model = TransformerLM(copy.deepcopy(cfg))
    return model_cost(model)


def format_cost(cost: ModelCost, cfg: ModelConfig) -> str:
    """Human-readable table of ``cost``."""
    rows = [("part", "ffw", "params", "active params", "train FLOPs/token")]
    for p in cost.parts:
        rows.append((p.name, p.kind, f"{p.total_params:,}", f"{p.active_params:,}", f"{p.train_flops:,}"))
    rows.append(("total", "", f"{cost.total_params:,}", f"{cost.active_params:,}", f"{cost.train_flops:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])] + [r[i].rjust(widths[i]) for i in (2, 3, 4)]
        lines.append("  ".join(cells))
        if j == 0 or j == len(rows) - 2:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(
        f"\nd_model={cfg.d_model} n_layers={cfg.n_layers} n_heads={cfg.n_heads} seq_len={cfg.seq_len} "
        f"vocab_size={cfg.vocab_size} ffw={cfg.ffw} at blocks {cfg.sparse_blocks() or 'none'} (0-based)"
        + (f" logit_prior={cfg.logit_prior} (the head's bias)" if cfg.logit_prior != "none" else "")
    )
    lines.append(
        "FLOPs: multiply-add = 2, training = 3 x forward; attention score term "
        "6*seq_len*d_model per layer; unembedding matmul counted, embedding lookup not."
    )
    if cost.aux_train_flops:
        lines.append(f"Training-only terms (PEER's balance term): {cost.aux_train_flops:,} of the train FLOPs/token.")
    return "\n".join(lines)
