"""Multi-process training with torch.distributed (launched by torchrun).

* dense parameters: data parallel (DDP); each rank trains on its slice of the global batch;
* PEER expert tables and PKM values: sharded by columns of d_model (``sharded_layers``), so each
  rank holds 1/W of them and of their optimizer state;
* checkpoints: torch.distributed.checkpoint, resharded on load to any number of processes.

See docs/parallel.md for the design and the communication per step.
"""

from torchpeer.parallel.collectives import ShardContext
from torchpeer.parallel.plan import DistributedPlan, plan_from_env
from torchpeer.parallel.runtime import DistEnv, destroy_distributed, init_distributed, launched_by_torchrun
from torchpeer.parallel.sharded_layers import shard_layer_, shard_model_, sharded_tables

__all__ = [
    "DistEnv",
    "DistributedPlan",
    "ShardContext",
    "destroy_distributed",
    "init_distributed",
    "launched_by_torchrun",
    "plan_from_env",
    "shard_layer_",
    "shard_model_",
    "sharded_tables",
]
