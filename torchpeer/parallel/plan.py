"""DistributedPlan: the trainer's parallel plan (torchpeer/lm/plan.py) for torchrun launches.

    torchrun --standalone --nproc_per_node 2 -m torchpeer.cli train ptb-tiny --train.device cpu

What each seam does with W processes:

* setup: join the process group (NCCL on GPUs, gloo on the CPU) from torchrun's variables;
  GPU = LOCAL_RANK.
* build_model: every rank builds the same full model from the same seed, then keeps only its
  columns of the PEER/PKM expert tables (sharded_layers.py): 1/W of the tables and, since the
  optimizer is built afterwards, of their AdamW moments.
* wrap_model: DDP over the dense parameters; the sharded tables are excluded (their gradients
  are already complete per shard). The replicated router (query network, norm, sub-keys) is in
  DDP: every rank computes the same, global gradient, whose average is itself.
* data: train.batch_size is the global batch; rank r trains on rows [r*B/W, (r+1)*B/W) of the
  same batches a single process would draw, so the global batch, data order and schedule do not
  depend on W, and each rank's mean loss + DDP's average is the one-process gradient.
* clip_grad_norm_: the norm over all ranks' shards (sharded tables' squares summed over ranks).
* evaluation: every rank runs every batch's row slice (the sharded layers need all ranks in each
  forward); nats and targets summed over ranks. Usage/KL of sharded layers are already global
  (retrieval runs on the gathered tokens); other routed layers' usage scores are summed.
* checkpoints: torch.distributed.checkpoint (checkpoint.py), resharded on load.

``plan_for_this_process()`` is the plan a command should train with: DistributedPlan under
torchrun, else ``OneProcessDCPPlan`` (one process, which also resumes a distributed run's ``dcp/``
checkpoint). The core (torchpeer.lm) never imports this package; its callers hand the plan in.
The DCP module is imported on first use: it costs ~0.6 s, and most one-process runs never need it.
"""

from __future__ import annotations

import contextlib
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

from torchpeer.lm.plan import SingleProcessPlan
from torchpeer.parallel.collectives import ShardContext
from torchpeer.parallel.runtime import destroy_distributed, init_distributed, launched_by_torchrun
from torchpeer.parallel.sharded_layers import shard_model_, sharded_tables


def grad_sq_sum(grads: list[torch.Tensor], device) -> torch.Tensor:
    """Sum of squares of all gradients, fp64 (accumulated per chunk of 2**24 elements: fp32
    tensor norms on the CPU are off by ~1e-4 at 5e5 elements, which changes the clip coefficient)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        for part in g.detach().reshape(-1).split(1 << 24):
            total += part.float().pow(2).sum(dtype=torch.float64)
    return total


def plan_from_env():
    """A DistributedPlan when torchrun launched this process (also with one process), else None."""
    return DistributedPlan() if launched_by_torchrun() else None


def plan_for_this_process() -> SingleProcessPlan:
    """DistributedPlan under torchrun, else OneProcessDCPPlan: what ``torchpeer train`` runs with."""
    return plan_from_env() or OneProcessDCPPlan()


class OneProcessDCPPlan(SingleProcessPlan):
    """One process, no process group; resumes one-process checkpoints and, unlike the core's
    SingleProcessPlan, also a distributed run's (``dcp/``: the full tables, read without torchrun)."""

    def load_checkpoint(self, path, model, optimizer, device) -> dict:
        from torchpeer.parallel import checkpoint as dcp_io

        if dcp_io.is_dcp_checkpoint(path):
            return dcp_io.load_dcp_checkpoint(path, model, optimizer)
        return super().load_checkpoint(path, model, optimizer, device)


class DistributedPlan(SingleProcessPlan):
    """W processes, one device each; see the module docstring.

    shard_experts: "auto" (shard the expert tables when W > 1; with one process there is nothing to
        split and the layers keep their fused one-device kernels), "always" (also with W = 1:
        exercises the sharded code path) or "never" (tables replicated under DDP; BatchNorm query
        statistics are then per rank, so W ranks no longer compute the one-process training).
    """

    SHARD_MODES = ("auto", "always", "never")

    def __init__(self, shard_experts: str = "auto"):
        if shard_experts not in self.SHARD_MODES:
            raise ValueError(f"shard_experts={shard_experts!r}; use one of {self.SHARD_MODES}")
        self.shard_experts = shard_experts
        self.rank, self.world_size = 0, 1
        self.env = None
        self.shard_ctx: ShardContext | None = None
        self._sharded_params: list[nn.Parameter] = []
        self._sharded_layers: set[int] = set()

    # ---------------------------------------------------------------- build

    def setup(self, device: torch.device) -> torch.device:
        self.env = init_distributed(device)
        self.rank, self.world_size = self.env.rank, self.env.world_size
        # the expert exchanges get a group of their own: never interleaved with DDP's buckets
        group = dist.new_group(list(range(self.world_size)))
        self.shard_ctx = ShardContext(group, self.rank, self.world_size)
        return self.env.device

    @contextlib.contextmanager
    def rank0_first(self):
        """Rank 0 runs the block first (tokenizer training, token cache), then the others (which
        read what it wrote). A failure on rank 0 is raised there; the others then time out."""
        if self.rank != 0:
            dist.barrier()
        try:
            yield
        finally:
            if self.rank == 0:
                dist.barrier()

    def build_model(self, build_fn, device: torch.device) -> nn.Module:
        model = super().build_model(build_fn, device)  # the full model, identical on every rank
        if self.shard_experts == "never" or (self.shard_experts == "auto" and self.world_size == 1):
            return model
        names = shard_model_(model, self.shard_ctx)
        for n in names:
            mod = model.get_submodule(n)
            self._sharded_layers.add(id(mod))
            self._sharded_params += [getattr(mod, t) for t in sharded_tables(mod)]
        return model

    def wrap_model(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ignore = [
            f"{prefix}.{t}" if prefix else t for prefix, mod in model.named_modules() for t in sharded_tables(mod)
        ]
        DDP._set_params_and_buffers_to_ignore_for_model(model, ignore)
        if not any(p.requires_grad and f not in ignore for f, p in model.named_parameters()):
            return model  # nothing to average
        uses_moe = any(type(m).__name__ == "MoE" for m in model.modules())
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        # Buffers (BatchNorm statistics of the replicated router) are computed identically on every
        # rank, so DDP need not broadcast them at each forward.
        with warnings.catch_warnings():  # newer torch renames the flag; the old name works in 2.4 .. 2.13
            warnings.simplefilter("ignore", FutureWarning)
            return DDP(model, device_ids=device_ids, broadcast_buffers=False, find_unused_parameters=uses_moe)

    def data_shard(self) -> tuple[int, int]:
        return self.rank, self.world_size

    # ---------------------------------------------------------------- train step

    def no_sync(self, wrapped: nn.Module, last_micro_batch: bool):
        if last_micro_batch or not hasattr(wrapped, "no_sync"):
            return super().no_sync(wrapped, last_micro_batch)
        return wrapped.no_sync()

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip by the global norm: replicated gradients counted once, sharded ones summed over ranks."""
        sharded_ids = {id(p) for p in self._sharded_params}
        grads = [p.grad for p in params if p.grad is not None and id(p) not in sharded_ids]
        shard_grads = [p.grad for p in params if p.grad is not None and id(p) in sharded_ids]
        device = self.env.device

        shard_sq = grad_sq_sum(shard_grads, device)
        if self.world_size > 1:
            dist.all_reduce(shard_sq)
        total = (grad_sq_sum(grads, device) + shard_sq).sqrt()
        if max_norm != float("inf"):
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for g in grads + shard_grads:
                g.mul_(coef.to(g.dtype))
        return total.float()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        out = value.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(out)
            out /= self.world_size
        return out

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=self.env.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # ---------------------------------------------------------------- evaluation

    def shard_batches(self, batches):
        """Rows [r*B/W, ...) of every batch (uneven splits allowed: the last batch may be short)."""
        ctx = self.shard_ctx
        try:
            for x, y in batches:
                rows = torch.arange(x.shape[0]).tensor_split(self.world_size)
                counts = [len(r) * x.shape[1] for r in rows]
                ctx.counts = None if len(set(counts)) == 1 else counts
                mine = rows[self.rank]
                yield x[mine], y[mine]
        finally:
            ctx.counts = None

    def all_reduce_sum_(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(value)
        return value

    def reduce_usage_(self, model: nn.Module) -> None:
        """Merge the routing statistics of layers that saw only this rank's tokens (data-parallel
        routers such as MoE) over ranks: usage counts the union of the experts selected anywhere.
        Sharded layers are skipped: they retrieved on the gathered batch, so theirs are global."""
        if self.world_size == 1:
            return
        device = self.env.device
        for mod in model.modules():
            tracker = getattr(mod, "usage_tracker", None)
            if tracker is None or id(mod) in self._sharded_layers or not hasattr(tracker, "n_experts"):
                continue
            everyone = torch.tensor([0 if tracker.scores is None else 1], device=device)
            dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
            if everyone.item() and hasattr(tracker, "reduce_"):
                tracker.reduce_(dist.all_reduce)  # all routing statistics (diagnostics.RoutingStats)
                continue
            # usage and KL only (a rank without tokens has no other statistics to merge)
            scores = tracker.scores
            if scores is None:
                scores = torch.zeros(tracker.n_experts, dtype=torch.float64, device=device)
            scores = scores.to(device)
            dist.all_reduce(scores)
            tracker.scores = scores

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, run_dir, step, model, optimizer, state, cfg, tokenizer, keep) -> str:
        from torchpeer.parallel import checkpoint as dcp_io

        return dcp_io.save_dcp_checkpoint(run_dir, step, model, optimizer, state, cfg, tokenizer, keep)

    def load_checkpoint(self, path, model, optimizer, device) -> dict:
        from torchpeer.parallel import checkpoint as dcp_io

        if dcp_io.is_dcp_checkpoint(path):
            return dcp_io.load_dcp_checkpoint(path, model, optimizer)
        return dcp_io.load_single_process_checkpoint(path, model, optimizer)  # a one-process run, continued on W

    def close(self) -> None:
        """Destroy the process groups, and drop this package's own references to them: the expert
        group's ShardContext (in collectives' registry) and the checkpoints' device mesh (the default
        group). destroy_process_group only unregisters a gloo group; the group, with its worker and
        TCP-loop threads, lives on while anything references it. Left to interpreter shutdown, those
        threads are torn down with the interpreter half gone (the likely cause of a rare SIGABRT,
        "terminate called without an active exception", of a torchrun rank at exit under CPU load).
        Released here, the groups are destroyed (their threads joined) once the trainer, which holds
        DDP, is freed: when train() returns."""
        if self.shard_ctx is not None:
            self.shard_ctx.release()
            self.shard_ctx = None
        dcp_io = sys.modules.get("torchpeer.parallel.checkpoint")  # imported only by runs that checkpoint
        if dcp_io is not None:
            dcp_io._Mesh.reset()
        destroy_distributed()
