"""The parallel-plan seam of the trainer: how a run is spread over processes.

The trainer never calls torch.distributed itself; every place where more than one process
would change what happens goes through a plan object. ``SingleProcessPlan`` (below) is the
default and the whole contract: a distributed plan (``torchpeer.parallel``) subclasses it and
overrides what it needs.

    trainer.build()                  plan.setup(device) -> device of this process
                                     plan.rank0_first() around tokenizer + token cache
                                     plan.build_model(build_fn, device) -> model (init on device,
                                         or sharded expert tables)
                                     plan.wrap_model(model) -> module used for training forwards
                                     plan.data_shard() -> (rank, world_size) of RandomWindows
                                         (train.batch_size is global: each rank gets batch / world)
    trainer.train_step()             plan.no_sync(wrapped, last_micro_batch) around each backward
                                     plan.clip_grad_norm_(params, max_norm) -> global grad norm
                                     plan.all_reduce_mean(tensor) -> logged loss across ranks
                                     plan.any_rank(flag) -> a SIGINT/SIGTERM seen anywhere stops all
    trainer.evaluate()               plan.shard_batches(batches) -> this rank's eval batches
                                     plan.all_reduce_sum_(tensor) -> eval sums across ranks
                                     plan.reduce_usage_(model) before usage_report(model)
    trainer.save/load_checkpoint()   plan.save_checkpoint(...), plan.load_checkpoint(...)
    logging, config.json, summary    only where plan.is_rank0
    end of run                       plan.close()
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from torchpeer.lm import checkpoint as ckpt_io


class SingleProcessPlan:
    """One process, one device: every method is the identity / a plain local call."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_rank0(self) -> bool:
        """Only rank 0 writes metrics, config.json, summary.json and prints."""
        return self.rank == 0

    # ---------------------------------------------------------------- build

    def setup(self, device: torch.device) -> torch.device:
        """Called first in build(): init process groups; returns the device this process uses."""
        return device

    def rank0_first(self) -> contextlib.AbstractContextManager:
        """Context around tokenizer training and token-cache writes: rank 0 runs it first, the others
        then read what it wrote (no two processes write the cache at once)."""
        return contextlib.nullcontext()

    def build_model(self, build_fn: Callable[[], nn.Module], device: torch.device) -> nn.Module:
        """Construct the model. build_fn() builds the full model under the current default device."""
        with torch.device(device):  # initialise in place: a 1M-expert table is GBs to copy from the CPU
            return build_fn()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module whose forward/backward training uses (e.g. DDP(model)); evaluation and
        checkpoints use the unwrapped ``model``."""
        return model

    def data_shard(self) -> tuple[int, int]:
        """(rank, world_size) passed to RandomWindows: each rank takes its slice of the global batch."""
        return self.rank, self.world_size

    # ---------------------------------------------------------------- train step

    def no_sync(self, wrapped: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Context around one micro-batch's forward+backward (DDP: skip the all-reduce until the last)."""
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip gradients in place by their global norm (over all ranks/shards); returns that norm."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over ranks (the logged training loss). Returns a tensor; may be ``value``."""
        return value

    def any_rank(self, flag: bool) -> bool:
        """True if ``flag`` is True on any rank (a stop signal seen by one rank stops all, together)."""
        return flag

    # ---------------------------------------------------------------- evaluation

    def shard_batches(self, batches: Iterable) -> Iterator:
        """This rank's share of an evaluation pass (every world_size-th batch, say)."""
        return iter(batches)

    def all_reduce_sum_(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (eval nats and target counts); returns it."""
        return value

    def reduce_usage_(self, model: nn.Module) -> None:
        """Sum the routers' usage accumulators over ranks before ``usage_report(model)``."""

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(
        self, run_dir: str, step: int, model: nn.Module, optimizer, state: dict, cfg, tokenizer, keep: int
    ) -> str:
        """Write checkpoint ``step`` (called on every rank); returns its folder.

        state: the trainer's own state (schedule, sampler, elapsed, loss window); the plan adds
        the model weights, the optimizer state and the RNG states.
        """
        return ckpt_io.save_checkpoint(
            run_dir, step, model, {**state, "optimizer": optimizer.state_dict()}, cfg, tokenizer, keep=keep
        )

    def load_checkpoint(self, path: str, model: nn.Module, optimizer, device: torch.device) -> dict:
        """Load weights and optimizer state of checkpoint folder ``path`` (verified first, see
        checkpoint.py); returns the trainer's state (as given to save_checkpoint, plus "step" and
        "rng"). The caller restores the RNG states. A distributed run's checkpoint (``dcp/``) is a
        ValueError here: torchpeer.parallel's plans read it (the core does not import them)."""
        if ckpt_io.is_dcp_checkpoint(path):
            raise ValueError(
                f"{path} was written by a distributed run (weights in dcp/): resume it with the torchpeer CLI, "
                "or pass plan=torchpeer.parallel.plan.plan_for_this_process() to train()"
            )
        ckpt_io.load_weights(model, path, device)
        state = ckpt_io.load_trainer_state(path)
        optimizer.load_state_dict(state.pop("optimizer"))
        return state

    def close(self) -> None:
        """End of run (also after an error): destroy process groups etc."""


def default_plan():
    """SingleProcessPlan. A torchrun launch needs torchpeer.parallel's plan, which the core does not
    import: its caller hands it in (the torchpeer CLI does, see cli/train.py)."""
    if all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        raise ValueError(
            "this process was started by torchrun: pass plan=torchpeer.parallel.DistributedPlan() "
            "(the torchpeer CLI does), or run it without torchrun"
        )
    return SingleProcessPlan()
