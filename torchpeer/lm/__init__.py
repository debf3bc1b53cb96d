"""Language-modelling system: config, transformer model, training, checkpoints, eval, generation.

    from torchpeer.lm import load_config, TransformerLM, train, evaluate, generate, config_cost

    cfg = load_config("ptb-tiny", ["--train.max_steps", "100"])   # shipped name or TOML path
    summary = train(cfg, "runs/demo")                              # see train.py for the run folder
    model, cfg, ckpt = load_model_from_checkpoint("runs/demo")
    print(config_cost(cfg.model).train_flops)                      # training FLOPs per token

Modules: config (dataclasses + validation), config_io (TOML, overrides), runtime (device, seeds,
TF32, autocast), model (TransformerLM, KVCache), info (parameter/FLOP accounting), optim (AdamW
groups, schedules), memory (step memory estimate), trainer (Trainer: build / train_step / evaluate /
checkpoint / fit), callbacks, plan (parallel-plan seam), interrupt (SIGINT/SIGTERM), metrics
(metrics.jsonl), rundir (run-folder writes), checkpoint, integrity (checksums.json of a checkpoint),
resume (which checkpoint and config a resume continues with), budget (steps of a run), evaluate,
generate; train (``train()``).
"""

from __future__ import annotations

from torchpeer.lazy import lazy_exports

# public name -> its module, loaded on first use (torchpeer/lazy.py): the command line imports
# config_io (override syntax, shipped config names) and must not import torch through the others
_EXPORTS = {
    "Callback": "torchpeer.lm.callbacks",
    "DenseConfig": "torchpeer.lm.config",
    "KVCache": "torchpeer.lm.model",
    "MoEConfig": "torchpeer.lm.config",
    "ModelConfig": "torchpeer.lm.config",
    "ModelCost": "torchpeer.lm.info",
    "PEERConfig": "torchpeer.lm.config",
    "PKMConfig": "torchpeer.lm.config",
    "RunConfig": "torchpeer.lm.config",
    "RunWriteError": "torchpeer.lm.rundir",
    "SingleProcessPlan": "torchpeer.lm.plan",
    "TrainConfig": "torchpeer.lm.config",
    "Trainer": "torchpeer.lm.train",
    "TrainingInterrupted": "torchpeer.lm.train",
    "TransformerLM": "torchpeer.lm.model",
    "apply_overrides": "torchpeer.lm.config_io",
    "config_cost": "torchpeer.lm.info",
    "dump_toml": "torchpeer.lm.config_io",
    "evaluate": "torchpeer.lm.evaluate",
    "generate": "torchpeer.lm.generate",
    "list_configs": "torchpeer.lm.config_io",
    "load_config": "torchpeer.lm.config_io",
    "load_model_from_checkpoint": "torchpeer.lm.checkpoint",
    "model_cost": "torchpeer.lm.info",
    "save_checkpoint": "torchpeer.lm.checkpoint",
    "train": "torchpeer.lm.train",
}

__all__ = [
    "Callback",
    "DenseConfig",
    "KVCache",
    "ModelConfig",
    "ModelCost",
    "MoEConfig",
    "PEERConfig",
    "PKMConfig",
    "RunConfig",
    "RunWriteError",
    "SingleProcessPlan",
    "TrainConfig",
    "Trainer",
    "TrainingInterrupted",
    "TransformerLM",
    "apply_overrides",
    "config_cost",
    "dump_toml",
    "evaluate",
    "generate",
    "list_configs",
    "load_config",
    "load_model_from_checkpoint",
    "model_cost",
    "save_checkpoint",
    "train",
]


lazy_exports(__name__)
