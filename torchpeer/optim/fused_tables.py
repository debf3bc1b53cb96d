"""Row-wise Adam fused into PEER's mixing backward: the tables never get a gradient tensor.

    table_opt = attach_rowwise_adam(model, lr=1e-3, weight_decay=0.0)   # before building AdamW
    for step ...:
        table_opt.set_lr(lr_now)          # read by the kernels during backward
        loss.backward()                   # updates every PEER table row the step selected
        optimizer.step()                  # AdamW for everything else (tables are not in it)

attach_rowwise_adam sets the tables' requires_grad to False (so AdamW groups and
clip_grad_norm_ skip them) and installs a `table_update` mixer on each PEER layer (the layer calls
it instead of expert_mix). Rule, lazy semantics and the clipping policy (table gradients are not
clipped): torchpeer/optim/rowwise_adam.py. One backward per forward: no gradient accumulation.
"""

from __future__ import annotations

import torch
from torch import nn

from torchpeer.optim.rowwise_adam import RowwiseAdamState

__all__ = ["RowwiseTableAdam", "attach_rowwise_adam"]


class _Mixer:
    """What a PEER layer calls instead of expert_mix (same arguments, minus backend)."""

    def __init__(self, owner: RowwiseTableAdam, name: str):
        self.owner, self.name = owner, name

    def __call__(self, x, down, up, indices, gates, activation):
        from torchpeer.ops.expert_mixing.triton_fused_op import expert_mix_rowwise_adam
        from torchpeer.ops.expert_mixing.triton_op import expert_mix_triton

        if not torch.is_grad_enabled():  # eval / generation: plain forward, nothing to update
            return expert_mix_triton(x, down, up, indices, gates, activation)
        s_down, s_up = self.owner.states[self.name]
        return expert_mix_rowwise_adam(x, down, up, indices, gates, activation, s_down, s_up, self.owner.hyper)


class RowwiseTableAdam:
    """Row-wise Adam state for the down/up tables of the given PEER layers ({name: layer})."""

    def __init__(
        self, layers: dict[str, nn.Module], lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
    ):
        if not layers:
            raise ValueError("rowwise_adam needs at least one PEER layer in the model (model.ffw = 'peer' somewhere)")
        if not (lr >= 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1 and eps >= 0 and weight_decay >= 0):
            raise ValueError(
                f"bad row-wise Adam settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        first = next(iter(layers.values())).down
        self.layers = layers
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.hyper = torch.tensor([lr, betas[0], betas[1], eps, weight_decay], dtype=torch.float32, device=first.device)
        self.states = {}
        for name, layer in layers.items():
            for t in (layer.down, layer.up):
                if t.device != first.device:
                    raise ValueError("rowwise_adam: all PEER tables must be on one device")
                t.requires_grad_(False)
            self.states[name] = (RowwiseAdamState.zeros_like(layer.down), RowwiseAdamState.zeros_like(layer.up))
            layer.table_update = _Mixer(self, name)

    @property
    def lr(self) -> float:
        return float(self.hyper[0])

    def set_lr(self, lr: float) -> None:
        """The lr the NEXT backward uses (a 4-byte device write; no sync)."""
        self.hyper[0] = lr

    def state_dict(self) -> dict:
        return {
            "hyper": self.hyper.cpu().tolist(),
            "layers": {n: {"down": d.state_dict(), "up": u.state_dict()} for n, (d, u) in self.states.items()},
        }

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.states) ^ set(sd["layers"])
        if missing:
            raise ValueError(f"row-wise Adam state does not match the model's PEER layers: {sorted(missing)}")
        self.hyper.copy_(torch.tensor(sd["hyper"], dtype=torch.float32))
        for n, (d, u) in self.states.items():
            d.load_state_dict(sd["layers"][n]["down"])
            u.load_state_dict(sd["layers"][n]["up"])

    def detach(self) -> None:
        """Back to plain autograd tables (requires_grad True, no mixer)."""
        for layer in self.layers.values():
            layer.table_update = None
            layer.down.requires_grad_(True)
            layer.up.requires_grad_(True)


def attach_rowwise_adam(
    model: nn.Module, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0
) -> RowwiseTableAdam:
    """Install the fused row-wise Adam on every PEER layer of `model` (call after model.to(device))."""
    from torchpeer.layers.peer import PEER
    from torchpeer.ops import resolve_backend

    layers = {name: m for name, m in model.named_modules() if isinstance(m, PEER)}
    for name, m in layers.items():
        if getattr(m, "column_shard", None) is not None:  # torchpeer.parallel's sharded forward
            raise ValueError("expert_optimizer=rowwise_adam is not supported with torchrun yet; use adamw")
        if not hasattr(m, "table_update"):
            raise ValueError(
                f"PEER layer {name} has no table_update hook (torchpeer.layers.peer too old for rowwise_adam)"
            )
        resolve_backend("expert_mix", "triton", m.down.device)  # ValueError naming the fix if Triton can't run
    return RowwiseTableAdam(layers, lr, betas, eps, weight_decay)
