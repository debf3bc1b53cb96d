"""Lazy Adam fused into PEER's mixing backward: the tables never get a gradient tensor.

    table_opt = attach_rowwise_adam(model, lr=1e-3, weight_decay=0.0)   # before building AdamW
    for step ...:
        table_opt.set_lr(lr_now)          # read by the kernels during backward (and step())
        loss.backward()                   # updates every PEER table row the step selected ...
        table_opt.step()                  # ... or, for a shared pool, here (see below)
        optimizer.step()                  # AdamW for everything else (tables are not in it)

attach_rowwise_adam sets the tables' requires_grad to False (so AdamW groups and
clip_grad_norm_ skip them) and installs a `table_update` mixer on each PEER layer (the layer calls
it instead of expert_mix). Rule, lazy semantics and the clipping policy (table gradients are not
clipped): torchpeer/optim/rowwise_adam.py; its second moment per row, or per element with
elementwise=True. One backward per forward: no gradient accumulation.
The layers and the optimizer reference each other (layer.table_update -> optimizer -> layer):
call detach() to hand the tables back and let both be freed without waiting for the gc.

A shared ExpertPool (PEER shared_pool: several layers read one pair of tables) cannot be stepped
inside each layer's backward (a later backward would read rows already stepped, and a row would
take one Adam step per layer). Its layers' backwards only keep their selections, and step()
applies ONE lazy Adam step per selected row from the gradient summed over all of them
(torchpeer/ops/expert_mixing/triton_deferred_op.py: what it keeps, ~4 KiB a token and layer for
the recommended config). Its state exists once, under the pool's module name.

On a layer whose tables torchpeer.parallel sharded by columns, each rank's state covers its
columns (exp_avg, master, element-wise exp_avg_sq) and whole rows (row-wise exp_avg_sq: all-reduced,
and steps: the same on every rank);
the sharded layer runs its own fused op with them (torchpeer/parallel/triton_mixing.py), and the
distributed checkpoint stores them like the tables (torchpeer/parallel/checkpoint.py). The
sharded layers support the paper's layer only, so no shared pool there.
"""

from __future__ import annotations

import torch
from torch import nn

from torchpeer.optim.rowwise_adam import RowwiseAdamState

__all__ = ["FUSED_EXPERT_OPTIMIZERS", "RowwiseTableAdam", "attach_rowwise_adam"]

# train.expert_optimizer's fused choices -> attach_rowwise_adam's options (bytes: lm/config.py's docstring)
FUSED_EXPERT_OPTIMIZERS = {
    "rowwise_adam": {"bf16_tables": False, "elementwise": False},
    "rowwise_adam_bf16": {"bf16_tables": True, "elementwise": False},
    "elementwise_adam": {"bf16_tables": False, "elementwise": True},
    "elementwise_adam_bf16": {"bf16_tables": True, "elementwise": True},
}


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

    def table_state(self):
        """-> (state of down, state of up, hyper): what a mixing op with the fused update needs (the
        column-sharded layer of torchpeer.parallel calls its own op with them)."""
        s_down, s_up = self.owner.states[self.name]
        return s_down, s_up, self.owner.hyper


class _PoolMixer:
    """What a PEER layer on a shared pool calls instead of expert_mix: the pool's deferred update
    (the layer's backward keeps its selections; RowwiseTableAdam.step() updates the pool).
    ``pool``: the layer's pool (PEER's table_update setter accepts a mixer for that pool only)."""

    def __init__(self, update, reader: int, pool: nn.Module):
        self.update, self.reader, self.pool = update, reader, pool

    def __call__(self, x, down, up, indices, gates, activation):
        from torchpeer.ops.expert_mixing.triton_op import expert_mix_triton

        if not torch.is_grad_enabled():  # eval / generation: plain forward, nothing to update
            return expert_mix_triton(x, down, up, indices, gates, activation)
        return self.update.mix(self.reader, x, down, up, indices, gates, activation)

    def table_state(self):
        raise ValueError(
            "the column-sharded (torchrun) PEER has no deferred table update for a shared pool (it runs the "
            "paper's layer only): use model.peer.shared_pool=false or one process"
        )


class RowwiseTableAdam:
    """Lazy Adam state for the down/up tables of the given PEER layers ({name: layer}) and of the
    shared pools they read ({name: ExpertPool}; a layer on a pool not given is refused); its
    state_dict says whether the second moments are element-wise (a resume must agree)."""

    def __init__(
        self,
        layers: dict[str, nn.Module],
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        bf16_tables: bool = False,
        bf16_moments: bool = False,
        elementwise: bool = False,
        pools: dict[str, nn.Module] | None = None,
    ):
        if not layers:
            raise ValueError("rowwise_adam needs at least one PEER layer in the model (model.ffw = 'peer' somewhere)")
        if not (lr >= 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1 and eps >= 0 and weight_decay >= 0):
            raise ValueError(
                f"bad row-wise Adam settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        first = next(iter(layers.values())).down
        self.layers = layers
        self.owners = _table_owners(layers, pools or {})
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.hyper = torch.tensor([lr, betas[0], betas[1], eps, weight_decay], dtype=torch.float32, device=first.device)
        self.bf16_tables, self.elementwise = bf16_tables, elementwise
        self.states = {}  # {owner name: (state of down, state of up)}: once per pair of tables
        for name, owner in self.owners.items():
            pair = []
            for t in (owner.down, owner.up):
                if t.device != first.device:
                    raise ValueError("rowwise_adam: all PEER tables must be on one device")
                t.requires_grad_(False)
                master = None
                if bf16_tables:  # the fp32 weights move into the optimizer; the layer keeps a bf16 copy
                    if t.dtype != torch.float32:
                        raise ValueError(f"bf16_tables needs fp32 tables to start from, got {t.dtype}")
                    master = t.data
                    t.data = master.to(torch.bfloat16)
                moment_dtype = torch.bfloat16 if bf16_moments else torch.float32
                pair.append(RowwiseAdamState.zeros_like(t, master, moment_dtype, elementwise))
            self.states[name] = tuple(pair)
        self.deferred = {}  # {pool name: DeferredTableUpdate}
        by_pool = {}  # {id(pool): its DeferredTableUpdate}
        for name, owner in self.owners.items():
            if name not in layers:  # a shared pool
                from torchpeer.ops.expert_mixing.triton_deferred_op import DeferredTableUpdate

                update = DeferredTableUpdate(owner.down, owner.up, *self.states[name], self.hyper)
                self.deferred[name] = by_pool[id(owner)] = update
        for reader, (name, layer) in enumerate(layers.items()):
            pool = getattr(layer, "pool", None)
            layer.table_update = _Mixer(self, name) if pool is None else _PoolMixer(by_pool[id(pool)], reader, pool)

    @property
    def lr(self) -> float:
        return float(self.hyper[0])

    def set_lr(self, lr: float) -> None:
        """The lr the NEXT backward (and step()) uses (a 4-byte device write; no sync)."""
        self.hyper[0] = lr

    def step(self) -> None:
        """The shared pools' update: one lazy Adam step of every pool row the last backward selected in
        any of the pool's layers, from the gradient summed over them. Call after every backward; with no
        shared pool it does nothing (a layer's own tables were updated inside the backward)."""
        for update in self.deferred.values():
            update.step()

    def state_dict(self) -> dict:
        """{"hyper", "elementwise", "layers": {owner: {"down", "up": RowwiseAdamState.state_dict()}}}; an
        owner is a layer with its own tables or a shared pool (by module name)."""
        return {
            "hyper": self.hyper.cpu().tolist(),
            "elementwise": self.elementwise,
            "layers": {n: {"down": d.state_dict(), "up": u.state_dict()} for n, (d, u) in self.states.items()},
        }

    def load_state_dict(self, sd: dict, restore_tables: bool = True) -> None:
        """Restore moments, steps, lr and (bf16_tables) the fp32 masters. restore_tables: also round
        the masters into the layers' bf16 working copies; False when the model's own checkpoint
        already restored those copies bit for bit (the trainer's resume: the kernel's rounding and
        torch's need not agree, e.g. the Triton interpreter truncates)."""
        missing = set(self.states) ^ set(sd["layers"])
        if missing:
            raise ValueError(f"row-wise Adam state does not match the model's PEER layers: {sorted(missing)}")
        theirs = sd.get("elementwise", False)  # (absent: a checkpoint from before element-wise states)
        if theirs != self.elementwise:
            kind = {True: "element-wise (elementwise_adam*)", False: "row-wise (rowwise_adam*)"}
            raise ValueError(
                f"the checkpoint's table optimizer keeps {kind[theirs]} second moments, this run's "
                f"{kind[self.elementwise]}: set train.expert_optimizer to the checkpoint's kind to resume"
            )
        self.hyper.copy_(torch.tensor(sd["hyper"], dtype=torch.float32))
        for n, (d, u) in self.states.items():
            d.load_state_dict(sd["layers"][n]["down"])
            u.load_state_dict(sd["layers"][n]["up"])
            if self.bf16_tables and restore_tables:  # the working copies follow the restored masters
                self.owners[n].down.data.copy_(d.master)
                self.owners[n].up.data.copy_(u.master)

    def detach(self) -> None:
        """Back to plain autograd tables (requires_grad True, no mixer; fp32 masters restored)."""
        for layer in self.layers.values():
            layer.table_update = None
        for name, owner in self.owners.items():
            if self.bf16_tables:
                owner.down.data, owner.up.data = (s.master for s in self.states[name])
            owner.down.requires_grad_(True)
            owner.up.requires_grad_(True)
        self.deferred = {}


def _table_owners(layers: dict[str, nn.Module], pools: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """{name: the module holding a pair of tables}: a layer without a pool (its own), each pool read."""
    pool_names = {id(p): n for n, p in pools.items()}
    owners = {}
    for name, layer in layers.items():
        pool = getattr(layer, "pool", None)
        if pool is None:
            owners[name] = layer
        elif id(pool) in pool_names:
            owners.setdefault(pool_names[id(pool)], pool)
        else:
            raise ValueError(f"PEER layer {name} reads a shared pool that is not among pools= (name it there)")
    return owners


def _other_ranks() -> bool:
    """True in a process group of more than one process."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def attach_rowwise_adam(model: nn.Module, *args, check_backend: bool = True, **kwargs) -> RowwiseTableAdam:
    """Install the fused row-wise Adam on every PEER layer of `model` (call after model.to(device)).

    The other arguments are RowwiseTableAdam's: lr, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=0.0, bf16_tables=False, bf16_moments=False, elementwise=False.

    bf16_tables: the layers' tables become bf16 working copies (the mixing kernels read half the
    bytes) and the fp32 weights live in the optimizer as masters (its state_dict carries them;
    the model's state_dict then holds bf16 tables). bf16_moments: first moments in bf16 (4 -> 2
    bytes per parameter of state, 16 -> 12 bytes of update traffic; rounded to nearest each step,
    so a moment's small increments can be lost: a quality cost to measure, not assumed free).
    elementwise: one fp32 second moment per element (lazy Adam as AdamW's rule), not per row: +4
    bytes per parameter of state, +8 of update traffic (train.expert_optimizer elementwise_adam*).
    check_backend=False skips the check that Triton can run on the tables' device (the sweep's dry
    run builds on the meta device to check everything else)."""
    from torchpeer.layers.peer import PEER
    from torchpeer.ops import resolve_backend

    layers = {name: m for name, m in model.named_modules() if isinstance(m, PEER)}
    read = {id(m.pool) for m in layers.values() if m.pool is not None}
    pools = {name: m for name, m in model.named_modules() if id(m) in read}
    for name, m in layers.items():
        if m.pool is not None and _other_ranks():
            raise ValueError(
                f"PEER layer {name} reads a shared pool: its fused update runs in one process only (torchrun's "
                "column-sharded PEER supports the paper's layer only): use train.expert_optimizer=adamw"
            )
        if getattr(m, "column_shard", None) is None and _other_ranks():
            # replicated tables would each step from their own rank's tokens and drift apart; sharded
            # by columns (torchpeer.parallel), every rank updates its columns from all tokens
            raise ValueError(
                f"rowwise_adam on {torch.distributed.get_world_size()} processes needs the PEER tables sharded by "
                f"columns ({name} is replicated): use DistributedPlan(shard_experts='auto' or 'always'), or adamw"
            )
        if not hasattr(m, "table_update"):
            raise ValueError(
                f"PEER layer {name} has no table_update hook (torchpeer.layers.peer too old for rowwise_adam)"
            )
        if check_backend:
            resolve_backend("expert_mix", "triton", m.down.device)  # ValueError naming the fix if Triton can't run
    return RowwiseTableAdam(layers, *args, **kwargs, pools=pools)
