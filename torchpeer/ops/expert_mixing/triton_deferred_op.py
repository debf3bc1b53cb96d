"""Expert mixing of several layers that read ONE pair of tables (PEER's shared ExpertPool), whose
rows take ONE lazy Adam step per optimizer step from all of those layers together.

Why not the per-layer fused update (triton_fused_op.py): it steps the tables inside each layer's
backward, so a layer whose backward runs later would compute its dx from rows already stepped, and
a row two layers selected would take two Adam steps on two partial gradients. Here each layer's
backward runs only the fused backward's pass 1 (dx, dgate from the unchanged tables) and keeps
what its passes 2-3 need; ``DeferredTableUpdate.step()`` then runs passes 2-3 ONCE over the union
of the kept selections (the layers' tokens concatenated, so a row's gradient is summed over every
layer and selection that chose it): lazy Adam on the pool's summed gradient, the rule of
torchpeer/optim/rowwise_adam.py, as the fused kernels apply it.

Kept per token of each reading layer until step() (copies: see ``_keep``): x and dy, d values each
in the mixing dtype (bf16 under autocast: 4d bytes), and per selection its expert index (int32),
gate, h = u.x and coef = g act'(h) (v.dy) (fp32): 16 bytes. The recommended config (d 512, 8 x 16
selections, bf16): 2 KiB + 2 KiB = 4 KiB a token and layer, 0.5 GiB for its four layers at 32k
tokens. step() concatenates them (one more copy, after the backward freed the activations), runs
the update and drops them.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from .triton_fused_op import check_fused_inputs, check_states, expert_update, state_tensors, token_pass
from .triton_op import _peer_mix_fwd

# key -> update, for the backward op (a custom op takes ints, not Python objects); weak: an update
# lives as long as its optimizer
_UPDATES: weakref.WeakValueDictionary[int, DeferredTableUpdate] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


class DeferredTableUpdate:
    """Lazy Adam for one pair of tables down, up (N, d) that several layers read: each layer mixes
    through ``mix`` (its backward keeps its selections), ``step()`` updates the tables once from all
    of them. state_down/state_up: RowwiseAdamState of each table; hyper: the (5,) fp32 device tensor
    [lr, beta1, beta2, eps, weight_decay], read by step()."""

    def __init__(self, down, up, state_down, state_up, hyper):
        check_states(down, up, state_down, state_up)
        self.down, self.up, self.hyper = down, up, hyper
        self.state_down, self.state_up = state_down, state_up
        self.key = next(_KEYS)
        _UPDATES[self.key] = self
        self._kept: dict[int, tuple] = {}  # reader -> (x, dy, indices, gates, h, coef, activation)

    def mix(self, reader: int, x, down, up, indices, gates, activation):
        """expert_mix (triton) of the layer numbered ``reader`` (x (T, d), indices and gates
        (T, H, K), down/up: this update's tables) -> y (T, d); its backward gives dx and dgates
        from the tables as they are and keeps what step() needs (once per reader and step)."""
        if down is not self.down or up is not self.up:
            raise ValueError("DeferredTableUpdate.mix: down and up must be the tables the update was built for")
        x = check_fused_inputs(x, down, up, indices, gates, activation, self.state_down, self.state_up, self.hyper)
        return _DeferredMix.apply(x, gates.contiguous(), down, up, indices.contiguous(), activation, self.key, reader)

    @property
    def pending(self) -> int:
        """How many readers' backwards are kept for the next step()."""
        return len(self._kept)

    def _keep(self, reader, x, dy, indices, gates, h, coef, activation) -> None:
        if reader in self._kept:
            raise RuntimeError(
                f"reader {reader} of the shared tables ran a second backward before their update: call the table "
                "optimizer's step() after every backward (RowwiseTableAdam.step; train.grad_accum must be 1)"
            )
        for kept in self._kept.values():
            if kept[2].shape[1] != indices[0].numel() or kept[-1] != activation:
                raise ValueError(
                    "the layers of one shared pool must select as many experts per token (heads * top_k) and "
                    f"use one activation for a joint update: got {kept[2].shape[1]} / {kept[-1]!r} and "
                    f"{indices[0].numel()} / {activation!r}"
                )
        # Copies, not references: under torch.compile these may be the backward graph's intermediate
        # buffers, which Inductor reuses once this op returns. int32 indices: N < 2^31 (the sort's keys).
        T = x.shape[0]
        idx_dtype = torch.int32 if self.down.shape[0] < 2**31 else torch.int64
        self._kept[reader] = (
            x.clone(),
            dy.clone(memory_format=torch.contiguous_format),
            indices.reshape(T, -1).to(idx_dtype, copy=True),
            gates.reshape(-1).clone(),
            h.reshape(-1).clone(),
            coef,  # (new in token_pass)
            activation,
        )

    def step(self) -> None:
        """One lazy Adam step of every row that a kept selection chose, from its gradient summed over
        all of them (the readers in number order: deterministic); then nothing is kept. A no-op when
        nothing is kept (e.g. after an evaluation)."""
        if not self._kept:
            return
        parts = [self._kept.pop(r) for r in sorted(self._kept)]
        activation = parts[0][-1]
        x, dy, indices, gates, h, coef = (torch.cat([p[i] for p in parts]) for i in range(6))
        states = state_tensors(self.down, self.state_down, self.state_up)
        expert_update(x, dy, indices, gates, h, coef, activation, self.down, self.up, states, self.hyper)


@torch.library.custom_op("torchpeer::peer_mix_bwd_deferred", mutates_args=())
def _peer_mix_bwd_deferred(
    dy: torch.Tensor,
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    h: torch.Tensor,
    activation: str,
    key: int,
    reader: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> dx (x dtype), dgate (T*S,) fp32 from the unchanged tables; keeps the reader's selections in
    update ``key`` (a side effect the compiler cannot see: an opaque op, run once per backward)."""
    dx, dgate, coef = token_pass(dy, x, down, up, indices, gates, h, activation)
    _UPDATES[key]._keep(reader, x, dy, indices, gates, h, coef, activation)
    return dx, dgate


@_peer_mix_bwd_deferred.register_fake
def _(dy, x, down, up, indices, gates, h, activation, key, reader):
    return x.new_empty(x.shape), x.new_empty((gates.numel(),), dtype=torch.float32)


class _DeferredMix(torch.autograd.Function):
    """Forward: the Triton mixing forward. Backward: dx and dgates for autograd; the tables get no
    gradient (they must not require grad) and are left alone until DeferredTableUpdate.step()."""

    @staticmethod
    def forward(ctx, x, gates, down, up, indices, activation, key, reader):
        y, h = _peer_mix_fwd(x, down, up, indices, gates, activation)
        ctx.save_for_backward(x, gates, indices, h)
        ctx.tables, ctx.activation, ctx.key, ctx.reader = (down, up), activation, key, reader
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gates, indices, h = ctx.saved_tensors
        down, up = ctx.tables
        dx, dgate = _peer_mix_bwd_deferred(dy, x, down, up, indices, gates, h, ctx.activation, ctx.key, ctx.reader)
        return dx, dgate.view(gates.shape).to(gates.dtype), None, None, None, None, None, None
