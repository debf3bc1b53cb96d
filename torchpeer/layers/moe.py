"""Mixture-of-Experts FFW baseline: E experts of FFW size, expert-choice or token-choice routing.

Both routings share one router (logits = x @ W_r, W_r: (d_model, E), softmax over experts) and one
expert bank (w_in: (E, d_model, d_expert), w_out: (E, d_expert, d_model)). The expert work is done
for all experts at once: tokens are gathered into an (E, C, d_model) buffer, C the capacity, and
pushed through two batched matmuls (``torch.bmm``); the results are scattered back with
``index_add_``. No Python loop over tokens or experts.

Capacity (both routings): C = ceil(capacity_factor * top_k * T / E), clamped to [1, T], where T is
the number of tokens in the call (all leading dimensions flattened). Rounding up means an expert
never gets fewer slots than the nominal share.

* ``routing="expert_choice"`` (Zhou et al. 2022; the PEER paper's MoE baseline): every expert picks
  its C highest-probability tokens; token t's output is sum over the experts e that picked it of
  p[t, e] * expert_e(x_t). A token may be picked by zero, one or several experts; on average it is
  processed by C * E / T ~ capacity_factor * top_k experts. Load is perfectly balanced by
  construction, so ``balance_loss`` is zero.

  Caution: the choice is made over all tokens of the call, so in a causal language model a
  token's output depends on the other tokens of the batch, *including later positions* (an expert
  may drop token t because later tokens scored higher). This leaks information from the future
  during training; evaluation numbers of such a model should be read with that in mind.

* ``routing="token_choice"`` (Switch / GShard style): every token picks its top_k experts.
  Gates: with top_k == 1 the gate is the raw softmax probability p[t, e] (Switch Transformer; a
  renormalised single gate would be identically 1 and the router would get no gradient from the
  task loss); with top_k > 1 the top_k probabilities are renormalised to sum to 1. Each expert
  accepts at most C assignments, in order of (choice rank, token position): all first choices in
  token order, then all second choices, ...; overflowing assignments are dropped (that expert
  contributes 0 to the token; the residual stream carries it). Gates are not renormalised after
  dropping. After forward, ``self.balance_loss`` holds the Switch load-balancing loss
  E * sum_e f_e * P_e (f_e: fraction of the T * top_k assignments routed to e before dropping,
  P_e: mean router probability of e); it equals 1 for perfectly uniform routing.
  ``aux_loss()`` returns ``aux_loss_weight * balance_loss`` (Switch uses 0.01), the term a trainer
  adds to the training loss (the LM trainer adds every FFW's ``aux_loss()``).

Registered as FFW kind "moe" (config ``MoEConfig``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchpeer.layers.accounting import FFWCost, count_params, matmul_flops
from torchpeer.layers.balance import histogram
from torchpeer.layers.registry import register_ffw
from torchpeer.layers.validators import check_choice, check_last_dim, check_positive, get_activation
from torchpeer.usage import UsageTrackingMixin

ROUTINGS = ("expert_choice", "token_choice")


@dataclass
class MoEConfig:
    """Options of ``MoE`` (the ``[model.moe]`` config section); ``aux_loss_weight`` scales the
    token-choice balance loss in ``aux_loss()``."""

    n_experts: int = 128
    d_expert: int | None = None
    routing: str = "expert_choice"
    capacity_factor: float = 1.0
    top_k: int = 1
    activation: str = "gelu"
    aux_loss_weight: float = 0.01


class MoE(UsageTrackingMixin, nn.Module):
    """Mixture of E FFW experts (see the module docstring for the routing rules).

    Args:
        d_model: input and output width.
        n_experts: number of experts E.
        d_expert: hidden width of each expert (default 4 * d_model: "experts of FFW size").
        routing: "expert_choice" | "token_choice".
        capacity_factor: scales the capacity C = ceil(capacity_factor * top_k * T / E).
        top_k: experts per token for token choice; for expert choice it multiplies the capacity
            (average experts per token = capacity_factor * top_k). The PEER baseline uses 1.
        activation: expert activation, "gelu" | "relu" | "silu".
        aux_loss_weight: weight of the balance loss in ``aux_loss()`` (0 turns it off).
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int = 128,
        d_expert: int | None = None,
        routing: str = "expert_choice",
        capacity_factor: float = 1.0,
        top_k: int = 1,
        activation: str = "gelu",
        aux_loss_weight: float = 0.01,
    ):
        super().__init__()
        d_expert = 4 * d_model if d_expert is None and isinstance(d_model, int) else d_expert
        check_positive(d_model=d_model, n_experts=n_experts, d_expert=d_expert, top_k=top_k)
        check_choice("routing", routing, ROUTINGS)
        if not (isinstance(capacity_factor, (int, float)) and math.isfinite(capacity_factor) and capacity_factor > 0):
            raise ValueError(f"capacity_factor must be a positive number, got {capacity_factor!r}")
        if top_k > n_experts:
            raise ValueError(f"top_k={top_k} must be <= n_experts={n_experts}")
        if not (isinstance(aux_loss_weight, (int, float)) and math.isfinite(aux_loss_weight) and aux_loss_weight >= 0):
            raise ValueError(f"aux_loss_weight must be a non-negative number, got {aux_loss_weight!r}")
        self.act = get_activation(activation)
        self.d_model, self.n_experts, self.d_expert = d_model, n_experts, d_expert
        self.routing, self.capacity_factor, self.top_k, self.activation = routing, capacity_factor, top_k, activation
        self.router = nn.Linear(d_model, n_experts, bias=False)
        # Same init as nn.Linear (uniform, bound 1/sqrt(fan_in)) so an expert starts like DenseFFW.
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, d_expert).uniform_(-1, 1) / math.sqrt(d_model))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_expert, d_model).uniform_(-1, 1) / math.sqrt(d_expert))
        self.aux_loss_weight = float(aux_loss_weight)
        self.balance_loss: torch.Tensor | None = None  # set by forward

    @classmethod
    def from_config(cls, d_model: int, cfg: MoEConfig) -> MoE:
        return cls(d_model, **dataclasses.asdict(cfg))

    def aux_loss(self) -> torch.Tensor | None:
        """``aux_loss_weight * balance_loss`` of the last forward (None before the first one or when
        the weight is 0); zero for expert choice, which is balanced by construction."""
        if self.balance_loss is None or self.aux_loss_weight == 0:
            return None
        return self.aux_loss_weight * self.balance_loss

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """The expert banks are ordinary dense weights (every expert sees ~C tokens per step):
        nothing is grouped specially."""
        return {"expert": [], "no_decay": []}

    def capacity(self, n_tokens: int) -> int:
        """Slots per expert for a call with n_tokens tokens: ceil(cf * top_k * T / E) in [1, T]."""
        c = math.ceil(self.capacity_factor * self.top_k * n_tokens / self.n_experts)
        return max(1, min(n_tokens, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_model) -> (..., d_model); all leading dimensions are routed together."""
        check_last_dim(x, self.d_model)
        shape = x.shape
        x = x.reshape(-1, self.d_model)  # (T, d)
        T = x.shape[0]
        if T == 0:
            self.balance_loss = x.new_zeros(())
            return x.new_zeros(shape)
        logits = self.router(x)  # (T, E)
        probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # >= fp32
        C = self.capacity(T)
        if self.routing == "expert_choice":
            token_of_slot, gate_of_slot, expert_of_slot = self._expert_choice(probs, C)
            self.balance_loss = probs.new_zeros(())
        else:
            token_of_slot, gate_of_slot, expert_of_slot = self._token_choice(probs, C)
        self._track_usage(expert_of_slot, gate_of_slot)

        E = self.n_experts
        xs = x[token_of_slot].view(E, C, self.d_model)  # (E, C, d): each expert's tokens
        h = self.act(torch.bmm(xs, self.w_in))  # (E, C, d_expert)
        out = torch.bmm(h, self.w_out).view(E * C, self.d_model)  # (E*C, d)
        out = out * gate_of_slot.to(out.dtype).unsqueeze(-1)  # empty slots have gate 0
        y = torch.zeros_like(x).index_add_(0, token_of_slot, out.to(x.dtype))
        return y.view(shape)

    def _expert_choice(self, probs: torch.Tensor, C: int):
        """Each expert takes its top-C tokens. Returns (E*C,) token ids, gates, expert ids."""
        gates, tokens = probs.t().topk(C, dim=-1)  # (E, C) each
        experts = torch.arange(self.n_experts, device=probs.device).repeat_interleave(C)
        return tokens.reshape(-1), gates.reshape(-1), experts

    def _token_choice(self, probs: torch.Tensor, C: int):
        """Each token takes its top-k experts, experts keep their first C assignments.

        Returns (E*C,) token ids, gates (0 for empty slots) and expert ids of the slots.
        """
        T, E, k = probs.shape[0], self.n_experts, self.top_k
        top_p, top_e = probs.topk(k, dim=-1)  # (T, k)
        gates = top_p if k == 1 else top_p / top_p.sum(-1, keepdim=True)
        # Switch load-balancing loss, from the assignments before capacity dropping. Every shape below
        # is fixed by (T, E, k, C), never by the routing's data (no bincount, no boolean mask), so the
        # layer compiles as one graph: the counts are a scatter_add_ into E bins, and a dropped
        # assignment writes to a spare slot E*C that is cut off at the end.
        counts = histogram(top_e.reshape(-1), E)
        frac = counts.to(probs.dtype) / (T * k)
        self.balance_loss = E * (frac * probs.mean(0)).sum()

        # Assignment order: choice rank first, then token position (rank-major flattening).
        expert = top_e.t().reshape(-1)  # (k*T,)
        token = torch.arange(T, device=probs.device).repeat(k)
        gate = gates.t().reshape(-1)
        # Position of each assignment within its expert's queue, via a stable sort by expert.
        order = torch.sort(expert, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.empty_like(expert)
        pos[order] = torch.arange(expert.numel(), device=probs.device) - starts[expert[order]]
        slot = torch.where(pos < C, expert * C + pos, E * C)  # (k*T,): E*C = dropped
        # Empty slots (gate 0) point at distinct tokens, not all at token 0: their zero contributions
        # then spread over many rows instead of piling E*C - kept atomic adds onto one row of the
        # gather's backward and the output's index_add_ (the same sums, without the contention).
        # Kept slots are distinct, so each is written once; only the spare slot is written many times.
        token_of_slot = (torch.arange(E * C + 1, device=probs.device) % T).scatter(0, slot, token)[: E * C]
        # Gates are scattered out-of-place so autograd flows back to the router.
        gate_of_slot = gate.new_zeros(E * C + 1).scatter(0, slot, gate)[: E * C]
        expert_of_slot = torch.arange(E, device=probs.device).repeat_interleave(C)
        return token_of_slot, gate_of_slot, expert_of_slot

    def cost(self) -> FFWCost:
        """Per-token cost. Active experts per token: top_k (token choice; an upper bound, as dropped
        assignments do no work) or capacity_factor * top_k (expert choice; the average over tokens,
        ignoring the ceil in C), rounded to the nearest integer count of expert parameters/FLOPs."""
        d, E, de = self.d_model, self.n_experts, self.d_expert
        per_token = self.top_k * (self.capacity_factor if self.routing == "expert_choice" else 1)
        expert_params = 2 * d * de
        expert_flops = matmul_flops(1, d, de) + matmul_flops(1, de, d)
        return FFWCost(
            total_params=count_params(self),
            active_params=d * E + round(per_token * expert_params),
            forward_flops=matmul_flops(1, d, E) + round(per_token * expert_flops),
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_experts={self.n_experts}, d_expert={self.d_expert}, routing={self.routing}, "
            f"capacity_factor={self.capacity_factor}, top_k={self.top_k}, activation={self.activation}, "
            f"aux_loss_weight={self.aux_loss_weight}"
        )


register_ffw("moe", MoEConfig, MoE.from_config)
