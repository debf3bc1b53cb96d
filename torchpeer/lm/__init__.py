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

from torchpeer.lm.callbacks import Callback
from torchpeer.lm.checkpoint import load_model_from_checkpoint, save_checkpoint
from torchpeer.lm.config import DenseConfig, ModelConfig, MoEConfig, PEERConfig, PKMConfig, RunConfig, TrainConfig
from torchpeer.lm.config_io import apply_overrides, dump_toml, list_configs, load_config
from torchpeer.lm.evaluate import evaluate
from torchpeer.lm.generate import generate
from torchpeer.lm.info import ModelCost, config_cost, model_cost
from torchpeer.lm.model import KVCache, TransformerLM
from torchpeer.lm.plan import SingleProcessPlan
from torchpeer.lm.rundir import RunWriteError
from torchpeer.lm.train import Trainer, TrainingInterrupted, train

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
