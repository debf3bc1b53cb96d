"""Run a function in W gloo processes from a test (torch.multiprocessing, spawn start method)."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, init_group: bool = True) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if init_group:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        if dist.is_initialized():  # (a DistributedPlan closes the group itself at the end of a run)
            dist.barrier()  # nobody tears the group down while another rank still uses it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world: int, *args, init_group: bool = True) -> None:
    """fn(rank, world, *args) in ``world`` processes with an initialised gloo group; raises if any fails.
    init_group=False: only torchrun's variables are set, and fn's code joins the group (as under torchrun)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args, init_group), nprocs=world, join=True)
