"""Sharded checkpoints through torch.distributed.checkpoint (DCP), resharded on load.

Layout (the same folder as a one-process checkpoint, see torchpeer/lm/checkpoint.py, with the
weights and optimizer moments in ``dcp/`` instead of ``model.safetensors``/``trainer.pt``)::

    step_00001000/
      dcp/            DCP files: every rank writes its columns of the expert tables (and of their
                      AdamW moments); replicated tensors are written once
      trainer.pt      step, schedule, sampler position, RNG states (rank 0's), loss window
      config.json     the run config
      tokenizer/

Keys are the one-process model's: ``blocks.2.ffw.down`` is saved as a DTensor sharded on dim 1
(columns) with its global shape, so a checkpoint written on W ranks loads on any W' (DCP reads
the column ranges each new rank needs), and in one process without a process group (full
tensors: ``torchpeer eval``/``generate``, or resuming on one process).

The fused lazy Adam's state (train.expert_optimizer=rowwise_adam*, elementwise_adam*), which the
trainer hands in as ``state["table_optimizer"]``, goes to ``dcp/`` too, under
``table_optim.<layer>.<down|up>.<name>``: exp_avg, fp32 master and an element-wise exp_avg_sq like
the tables (this rank's columns, a DTensor of the full (N, d)), a row-wise exp_avg_sq and steps (N,)
as replicated tensors (whole rows, the same on every rank), written once; trainer.pt keeps its
hyper-parameters, whether v is element-wise, and the list of those tensors. It reshards like the tables.

Atomic: the folder is assembled under ``.step_<step>.<random>.tmp`` (a name rank 0 chooses and
broadcasts) and renamed into place by rank 0 after every rank finished writing, so a crash
mid-save leaves the previous checkpoint as the latest complete one (and the trainer deletes the
partial folder at the next start).
"""

from __future__ import annotations

import os
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from torchpeer.lm.checkpoint import (
    load_trainer_state,
    make_room,
    new_partial_dir,
    publish_checkpoint,
    write_checkpoint_meta,
)
from torchpeer.lm.integrity import CheckpointDamaged, verify_checkpoint
from torchpeer.parallel.sharded_layers import sharded_tables

DCP_DIR = "dcp"


def is_dcp_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, DCP_DIR))


def _sharded_names(model: nn.Module) -> dict[str, object]:
    """{parameter name: ShardContext} of the column-sharded tables of ``model``."""
    out = {}
    for prefix, mod in model.named_modules():
        for name in sharded_tables(mod):
            out[f"{prefix}.{name}" if prefix else name] = mod.column_shard
    return out


class _Mesh:
    """One 1-D device mesh over the sharded layers' ranks, made on first use."""

    mesh = None

    @classmethod
    def get(cls, device_type: str, world: int):
        if cls.mesh is None or cls.mesh.size() != world:
            from torch.distributed.device_mesh import init_device_mesh

            cls.mesh = init_device_mesh(device_type, (world,))
        return cls.mesh

    @classmethod
    def reset(cls) -> None:
        """Drop the cached mesh (end of run): it holds the default process group, which would otherwise
        live, with its gloo threads, until interpreter shutdown, and be reused by a later group."""
        cls.mesh = None


def _as_global(t: torch.Tensor, sharded: bool):
    """A column shard as a DTensor of the full table (Shard(1)); other tensors as they are."""
    if not sharded:
        return t
    from torch.distributed.tensor import DTensor, Shard

    world = dist.get_world_size()
    mesh = _Mesh.get(t.device.type, world)
    return DTensor.from_local(t, mesh, [Shard(1)], run_check=False)


def _init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's per-parameter state (zeros) without changing a weight: one step at lr 0 and
    zero gradients, so that DCP can load the moments in place (whatever the torch version's state
    layout, dtypes and devices)."""
    if all(p in optimizer.state for g in optimizer.param_groups for p in g["params"]):
        return
    saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in optimizer.param_groups]
    grads = {}
    for g in optimizer.param_groups:
        g["lr"], g["weight_decay"] = 0.0, 0.0
        for p in g["params"]:
            grads[p] = p.grad
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, (lr, wd) in zip(optimizer.param_groups, saved):
        g["lr"], g["weight_decay"] = lr, wd
        for p in g["params"]:
            p.grad = grads[p]


def _state_dict(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """The DCP state dict: {"model": {key: tensor}, "optim": {param name: {state key: tensor}}}."""
    sharded = _sharded_names(model)
    params = dict(model.named_parameters())
    out = {"model": {k: _as_global(v, k in sharded) for k, v in model.state_dict().items()}}
    if optimizer is not None:
        names = {id(p): n for n, p in params.items()}
        optim = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                optim[name] = {
                    k: _as_global(v, name in sharded and v.shape == p.shape) if torch.is_tensor(v) else v
                    for k, v in optimizer.state[p].items()
                }
        out["optim"] = optim
    return out


def _dcp_load(target: dict, path: str) -> None:
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*load in a single process.*")
        dcp.load(target, checkpoint_id=os.path.join(path, DCP_DIR))


def _copy_back(model: nn.Module, optimizer, loaded: dict) -> None:
    """Copy loaded tensors into the model/optimizer where DCP loaded into a copy (DTensor locals)."""
    with torch.no_grad():
        for k, v in model.state_dict(keep_vars=True).items():
            src = _local(loaded["model"][k])
            if src.data_ptr() != v.data_ptr():
                v.copy_(src)
        if optimizer is not None:
            params = dict(model.named_parameters())
            for name, entries in loaded.get("optim", {}).items():
                state = optimizer.state[params[name]]
                for key, value in entries.items():
                    if torch.is_tensor(value):
                        src = _local(value)
                        if src.data_ptr() != state[key].data_ptr():
                            state[key].copy_(src)
                    else:
                        state[key] = value


TABLE_KEY = "table_optim"


def _is_sharded_layer(model: nn.Module, name: str) -> bool:
    return getattr(model.get_submodule(name), "column_shard", None) is not None


def _split_table_state(state: dict, model: nn.Module) -> tuple[dict, dict | None]:
    """-> (trainer state for trainer.pt, {layer: {down|up: {name: tensor}}} for dcp/ or None).
    trainer.pt keeps "hyper", "elementwise" and "dcp": {layer: {down|up: {name: dtype}}} (what dcp/ holds)."""
    table = state.get("table_optimizer")
    if table is None:
        return state, None
    tensors, listing = {}, {}
    for layer, pair in table["layers"].items():
        sharded = _is_sharded_layer(model, layer)
        tensors[layer] = {
            w: {k: _as_global(v, sharded and v.dim() == 2) for k, v in sd.items()} for w, sd in pair.items()
        }
        listing[layer] = {w: {k: str(v.dtype).removeprefix("torch.") for k, v in sd.items()} for w, sd in pair.items()}
    kept = {"hyper": table["hyper"], "elementwise": table.get("elementwise", False), "dcp": listing}
    return {**state, "table_optimizer": kept}, tensors


def _table_targets(listing: dict, model: nn.Module, elementwise: bool) -> dict:
    """Zero tensors in this rank's shapes for DCP to load the table optimizer's state into
    (elementwise: exp_avg_sq is (N, d) like exp_avg, else (N,))."""
    per_element = ("exp_avg", "master") + (("exp_avg_sq",) if elementwise else ())
    out = {}
    for layer, pair in listing.items():
        mod, sharded = model.get_submodule(layer), _is_sharded_layer(model, layer)
        out[layer] = {}
        for which, names in pair.items():
            table = getattr(mod, which)
            out[layer][which] = {}
            for k, dtype in names.items():
                shape = table.shape if k in per_element else table.shape[:1]
                t = torch.zeros(shape, dtype=getattr(torch, dtype), device=table.device)
                out[layer][which][k] = _as_global(t, sharded and t.dim() == 2)
    return out


def _local(t):
    """This rank's part of a DTensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard_table_state_(table: dict, model: nn.Module) -> dict:
    """A one-process table optimizer state (full columns) -> this rank's columns, in place."""
    for layer, pair in table["layers"].items():
        if _is_sharded_layer(model, layer):
            ctx = model.get_submodule(layer).column_shard
            for sd in pair.values():
                for k, v in sd.items():
                    if v.dim() == 2:
                        sd[k] = v[:, ctx.columns(v.shape[1])].clone()
    return table


def save_dcp_checkpoint(
    run_dir: str, step: int, model: nn.Module, optimizer, state: dict, cfg, tokenizer, keep: int
) -> str:
    """Write ``checkpoints/step_<step>`` (collective: every rank calls it); returns its path. Rank 0
    writes checksums.json of the whole folder (every rank's shards) before renaming it into place;
    on a disk with less room than the newest checkpoint takes, it first deletes the ones the save
    would prune afterwards (``make_room``, as a one-process save does)."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:  # on a nearly full disk the checkpoints pruned after the save go first (before the others write)
        make_room(run_dir, keep)
    where = [new_partial_dir(run_dir, step) if rank0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(where, src=0)  # every rank writes into the same temporary folder
    tmp, final = where[0]
    state, tables = _split_table_state(state, model)
    try:
        to_save = _state_dict(model, optimizer)
        if tables is not None:
            to_save[TABLE_KEY] = tables
        dcp.save(to_save, checkpoint_id=os.path.join(tmp, DCP_DIR))
        if rank0:
            write_checkpoint_meta(tmp, state, step, cfg, tokenizer)
        if dist.is_initialized():
            dist.barrier()  # all shards are on disk before the folder becomes visible
        if rank0:
            publish_checkpoint(tmp, final, run_dir, keep)
    except BaseException:
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_initialized():
        dist.barrier()  # nobody resumes or prunes before the rename
    return final


def load_dcp_checkpoint(path: str, model: nn.Module, optimizer=None) -> dict:
    """Load weights (and AdamW moments) of a DCP checkpoint into ``model`` (sharded or not) and
    ``optimizer``; returns the trainer state of ``trainer.pt`` (with "step" and "rng"; a row-wise
    table optimizer's state, if saved, as ``state["table_optimizer"]``: this rank's columns, for
    RowwiseTableAdam.load_state_dict). The folder is verified first (checksums.json, lm/integrity.py)."""
    if not is_dcp_checkpoint(path):
        raise FileNotFoundError(f"{path!r} is not a distributed checkpoint (no {DCP_DIR}/ folder)")
    verify_checkpoint(path)
    state = load_trainer_state(path)
    table = state.get("table_optimizer")
    if table is not None and "dcp" in table and optimizer is not None:
        in_adamw = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if any(id(getattr(model.get_submodule(n), w)) in in_adamw for n, pair in table["dcp"].items() for w in pair):
            kind = "elementwise_adam" if table.get("elementwise", False) else "rowwise_adam"
            kind += "_bf16" if any("master" in sd for pair in table["dcp"].values() for sd in pair.values()) else ""
            raise ValueError(f"{path} was trained with train.expert_optimizer={kind}; resume with {kind}")
    if optimizer is not None:
        _init_optimizer_state(optimizer)
    target = _state_dict(model, optimizer)
    if table is not None and "dcp" in table:
        target[TABLE_KEY] = _table_targets(table["dcp"], model, table.get("elementwise", False))
    _dcp_load(target, path)
    _copy_back(model, optimizer, target)
    if TABLE_KEY in target:
        layers = {
            n: {w: {k: _local(v) for k, v in sd.items()} for w, sd in pair.items()}
            for n, pair in target[TABLE_KEY].items()
        }
        state["table_optimizer"] = {**{k: v for k, v in table.items() if k != "dcp"}, "layers": layers}
    return state


def load_single_process_checkpoint(path: str, model: nn.Module, optimizer=None) -> dict:
    """Load a one-process checkpoint (``model.safetensors`` + ``trainer.pt`` with the optimizer)
    into a (possibly column-sharded) model: each rank keeps its columns of the tables and of
    their AdamW moments (and of a row-wise table optimizer's state). Returns the trainer state (with
    "step" and "rng"). Verified first."""
    from safetensors.torch import load_file

    verify_checkpoint(path)
    sharded = _sharded_names(model)
    try:
        full = load_file(os.path.join(path, "model.safetensors"))
    except Exception as e:  # an unverified (older) file that passed the format checks but not safetensors'
        raise CheckpointDamaged(path, f"model.safetensors cannot be read ({str(e).splitlines()[0]})") from None
    target = model.state_dict()
    loaded_ptrs = set()
    with torch.no_grad():
        for key, value in full.items():
            if key not in target:
                raise ValueError(f"{path}: tensor {key!r} is not in this model; was it written for another config?")
            if key in sharded:
                value = value[:, sharded[key].columns(value.shape[1])]
            target[key].copy_(value)
            loaded_ptrs.add(target[key].data_ptr())
    missing = [k for k, v in target.items() if v.data_ptr() not in loaded_ptrs]  # tied tensors are stored once
    if missing:
        raise ValueError(f"{path}: model.safetensors lacks {missing[:5]}; was it written for another config?")
    state = load_trainer_state(path)
    if "table_optimizer" in state:  # a row-wise table optimizer's full state: keep my columns
        shard_table_state_(state["table_optimizer"], model)
    opt_state = state.pop("optimizer", None)
    if optimizer is not None and opt_state is not None:
        order = [p for g in optimizer.param_groups for p in g["params"]]
        names = {id(p): n for n, p in model.named_parameters()}
        for i, entries in opt_state["state"].items():
            name = names[id(order[int(i)])]
            if name in sharded:
                for k, v in entries.items():
                    if torch.is_tensor(v) and v.dim() == 2:
                        entries[k] = v[:, sharded[name].columns(v.shape[1])].clone()
        optimizer.load_state_dict(opt_state)
    return state


def load_dcp_weights(model: nn.Module, path: str) -> None:
    """Weights only (``torchpeer eval`` / ``generate`` in one process). Verified first."""
    verify_checkpoint(path)
    target = _state_dict(model, None)
    _dcp_load(target, path)
    _copy_back(model, None, target)
