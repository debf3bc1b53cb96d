"""Language-modelling system: config, transformer model, training, checkpoints, eval, generation.

    from torchpeer.lm import load_config, TransformerLM, train, evaluate, generate, config_cost

    cfg = load_config("ptb-tiny", ["--train.max_steps", "100"])   # shipped name or TOML path
    summary = train(cfg, "runs/demo")                              # see train.py for the run folder
    model, cfg, ckpt = load_model_from_checkpoint("runs/demo")
    print(config_cost(cfg.model).train_flops)                      # training FLOPs per token

Modules: config (dataclasses, TOML, overrides), model (TransformerLM, KVCache), info
(parameter/FLOP accounting), optim (AdamW groups, schedules), train, checkpoint, evaluate, generate.
"""

from torchpeer.lm.checkpoint import load_model_from_checkpoint, save_checkpoint
from torchpeer.lm.config import (
    DenseConfig,
    ModelConfig,
    MoEConfig,
    PEERConfig,
    PKMConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    list_configs,
    load_config,
)
from torchpeer.lm.evaluate import evaluate
from torchpeer.lm.generate import generate
from torchpeer.lm.info import ModelCost, config_cost, model_cost
from torchpeer.lm.model import KVCache, TransformerLM
from torchpeer.lm.train import train

__all__ = [
    "DenseConfig",
    "KVCache",
    "ModelConfig",
    "ModelCost",
    "MoEConfig",
    "PEERConfig",
    "PKMConfig",
    "RunConfig",
    "TrainConfig",
    "TransformerLM",
    "apply_overrides",
    "config_cost",
    "evaluate",
    "generate",
    "list_configs",
    "load_config",
    "load_model_from_checkpoint",
    "model_cost",
    "save_checkpoint",
    "train",
]
