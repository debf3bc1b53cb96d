"""Run a function in W gloo processes from a test (torch.multiprocessing, spawn start method)."""

from __future__ import annotations

import os
import socket
import sys

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
        release_parallel_state()
        if dist.is_initialized():
            dist.destroy_process_group()
    # A worker that passed ends here, without the interpreter's shutdown: gloo threads that something
    # still references (after the checks, destroy_process_group does not always join them all) would
    # otherwise be torn down with the interpreter half gone, and under CPU load a rank aborts ("terminate
    # called without an active exception", SIGABRT; seen in CI on 2026-12-04 and 2026-12-05).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def release_parallel_state() -> None:
    """Drop what torchpeer.parallel keeps referencing after a worker's checks: the ShardContexts the
    workers made (a registry keeps each alive, and with it the process group) and the checkpoints'
    device mesh. Otherwise the gloo groups and their threads live until interpreter shutdown, where a
    rank can abort ("terminate called without an active exception", SIGABRT) under CPU load, as
    DistributedPlan.close() explains for runs."""
    collectives = sys.modules.get("torchpeer.parallel.collectives")
    if collectives is not None:
        for ctx in list(collectives._CONTEXTS.values()):
            ctx.release()
    dcp_io = sys.modules.get("torchpeer.parallel.checkpoint")
    if dcp_io is not None:
        dcp_io._Mesh.reset()


def run_workers(fn, world: int, *args, init_group: bool = True) -> None:
    """fn(rank, world, *args) in ``world`` processes with an initialised gloo group; raises if any fails.
    init_group=False: only torchrun's variables are set, and fn's code joins the group (as under torchrun)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args, init_group), nprocs=world, join=True)
