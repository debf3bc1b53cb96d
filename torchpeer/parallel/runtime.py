"""Process groups from torchrun's environment: who am I, how many are we, which device is mine.

torchrun (``torchrun --nproc_per_node N -m torchpeer.cli train ...``) starts N copies of the
command and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each. A plain
``torchpeer train`` sets none of them and stays one process without a process group.

Backend: NCCL when this process trains on a GPU, gloo on the CPU (gloo also runs the CPU tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun() -> bool:
    """True when torchrun (or another launcher using its variables) started this process."""
    return all(v in os.environ for v in TORCHRUN_VARS)


@dataclass
class DistEnv:
    """This process's place in the job.

    rank: global rank in [0, world_size); local_rank: rank on this node (picks the GPU);
    device: the device this process trains on; backend: "nccl" or "gloo".
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def init_distributed(device: torch.device, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group described by torchrun's variables (idempotent).

    device: the device the config asks for (``train.device`` resolved). On CUDA each process takes
    ``cuda:LOCAL_RANK``; asking for a GPU index of your own under torchrun is an error, because the
    launcher, not the config, decides which GPU a rank uses.
    """
    if not launched_by_torchrun():
        raise ValueError(
            "init_distributed needs torchrun's RANK, WORLD_SIZE and LOCAL_RANK; launch with "
            "'torchrun --nproc_per_node N -m torchpeer.cli train ...'"
        )
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if device.type == "cuda":
        if device.index not in (None, local) and world > 1:
            raise ValueError(
                f"train.device={device} under torchrun: each rank uses cuda:LOCAL_RANK; use --train.device cuda"
            )
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are visible; "
                "lower --nproc_per_node to the number of GPUs of the node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"distributed training runs on cuda (NCCL) or cpu (gloo), not {device.type}")
    if not dist.is_initialized():
        import datetime

        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
