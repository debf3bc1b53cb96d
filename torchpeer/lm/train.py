"""Training loop: AdamW + warmup/cosine (or WSD), grad accumulation and clipping, bf16 autocast on
CUDA, periodic evaluation and atomic checkpoints, exact resume.

Run folder layout::

    RUN_DIR/config.json        resolved run config
    RUN_DIR/metrics.jsonl      one JSON object per log / eval event
    RUN_DIR/checkpoints/       see checkpoint.py (the newest ``train.keep_checkpoints``)
    RUN_DIR/summary.json       final evaluation and costs
    RUN_DIR/tb/                TensorBoard events (when tensorboard is installed)

Exact resume: a checkpoint holds everything the remaining steps depend on (weights and
BatchNorm buffers, optimizer moments, step, the sampler's position, RNG states), so a run killed
at any point and resumed from its latest checkpoint logs the same losses at the same steps as an
uninterrupted run (bit-exact on the CPU; on CUDA up to nondeterministic kernels). On resume the
metrics records after the checkpoint's step are dropped, so the log reads as one run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from torchpeer.data.atomic import write_json_atomic
from torchpeer.lm.checkpoint import (
    latest_checkpoint,
    load_checkpoint_tokenizer,
    load_trainer_state,
    load_weights,
    read_checkpoint_config,
    save_checkpoint,
    set_rng_state,
)
from torchpeer.lm.config import RunConfig
from torchpeer.lm.evaluate import evaluate
from torchpeer.lm.info import model_cost
from torchpeer.lm.model import TransformerLM
from torchpeer.lm.optim import LRSchedule, build_optimizer, set_lr


def resolve_device(spec: str) -> torch.device:
    """ "auto" -> cuda if available else cpu; anything else is passed to torch.device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"train.device={spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device asks for cuda but no CUDA device is available; use --train.device cpu")
    return dev


def check_same_model(saved: RunConfig, cfg: RunConfig, ckpt: str) -> None:
    """Raise ValueError naming the model fields in which ``cfg`` differs from the checkpoint's."""
    a, b = saved.model, cfg.model
    da, db = _flat(vars_of(a), "model"), _flat(vars_of(b), "model")
    if b.vocab_size is None:
        db["model.vocab_size"] = da["model.vocab_size"]
    diffs = [
        f"{k}: checkpoint {da.get(k)!r}, now {db.get(k)!r}" for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k)
    ]
    if saved.data.tokenizer != cfg.data.tokenizer:
        diffs.append(f"data.tokenizer: checkpoint {saved.data.tokenizer!r}, now {cfg.data.tokenizer!r}")
    if diffs:
        raise ValueError(
            f"cannot resume from {ckpt}: the model config differs from the checkpoint's ({'; '.join(diffs)}); "
            "resume with the checkpoint's settings, or start a new run with another --run-dir"
        )


def vars_of(obj) -> dict:
    import dataclasses

    return dataclasses.asdict(obj)


def _flat(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{k}"] = v
    return out


def plan_steps(cfg: RunConfig, train_flops_per_token: int) -> int:
    """Number of optimizer steps: the first of max_steps / max_tokens / max_flops reached."""
    t = cfg.train
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len
    limits = []
    if t.max_steps is not None:
        limits.append(int(t.max_steps))
    if t.max_tokens is not None:
        limits.append(math.ceil(t.max_tokens / tokens_per_step))
    if t.max_flops is not None:
        n = int(t.max_flops // (train_flops_per_token * tokens_per_step))
        if n < 1:
            raise ValueError(
                f"train.max_flops={t.max_flops:.3g} is less than one step "
                f"({train_flops_per_token * tokens_per_step:.3g} FLOPs); raise it or shrink the batch"
            )
        limits.append(n)
    return min(limits)


class MetricsLog:
    """metrics.jsonl writer (+ TensorBoard scalars when available)."""

    def __init__(self, run_dir: str, tensorboard: bool, start_step: int):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.truncate_after(start_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops TensorBoard events a killed run wrote after the checkpoint
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step if start_step > 0 else None)
            except Exception:  # tensorboard not installed (or broken): JSON lines only
                self.tb = None

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps <= ``step`` (resume; -1 = none), rewritten atomically."""
        if not os.path.exists(self.path):
            return
        keep = []
        with open(self.path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by the kill
                    continue
                if rec.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        from torchpeer.data.atomic import write_text_atomic

        write_text_atomic(self.path, "".join(keep))

    def write(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for key, value in _flat(rec, "").items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != ".step":
                    self.tb.add_scalar(key.lstrip("."), value, rec["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(cfg: RunConfig, run_dir: str, resume: bool = False, progress: bool = True) -> dict:
    """Train ``cfg`` in ``run_dir``; returns the summary (final evaluation, costs, timing).

    resume: continue from the latest checkpoint of run_dir (start fresh if it has none).
    Without resume, a run_dir that already holds checkpoints is an error (nothing is touched).
    """
    from torchpeer.data import RandomWindows, load_tokenizer, prepare_split

    cfg.validate()
    t = cfg.train
    device = resolve_device(t.device)

    # --- everything that can fail on bad input happens before anything is written
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise ValueError(
            f"{run_dir} already holds checkpoints (latest: {os.path.basename(ckpt)}); pass --resume to "
            "continue that run, or choose another --run-dir"
        )
    if ckpt is not None:
        check_same_model(read_checkpoint_config(ckpt), cfg, ckpt)

    # A resumed run keeps the tokenizer it was trained with (saved in the checkpoint).
    tok = (load_checkpoint_tokenizer(ckpt) if ckpt is not None else None) or load_tokenizer(cfg.data, progress)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ValueError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tok.vocab_size}, {tok.name}); omit model.vocab_size to take it from the tokenizer"
        )
    train_tf = prepare_split(cfg.data, cfg.data.train, "train", tokenizer=tok, progress=progress)
    valid_tfs = {
        name: prepare_split(cfg.data, spec, f"valid/{name}", tokenizer=tok, progress=progress)
        for name, spec in cfg.data.valid.items()
    }

    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2**32)
    random.seed(t.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    with torch.device(device):  # initialise in place: a 1M-expert table is GBs to copy from the CPU
        model = TransformerLM(cfg.model)
    cost = model_cost(model)
    total_steps = plan_steps(cfg, cost.train_flops)
    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len
    optimizer = build_optimizer(model, t, device.type)
    fresh_groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    schedule = LRSchedule(t.schedule, total_steps, t.warmup_steps, t.min_lr_ratio, t.decay_frac)
    sampler = RandomWindows(train_tf, t.batch_size, cfg.model.seq_len, seed=t.seed)

    step, elapsed = 0, 0.0
    if ckpt is not None:
        load_weights(model, ckpt, device)
        state = load_trainer_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        for g, fresh in zip(optimizer.param_groups, fresh_groups):
            g.update(fresh)  # hyper-parameters come from the (possibly edited) config, moments from the file
        sampler.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        step, elapsed = state["step"], state.get("elapsed", 0.0)
        if step > total_steps:
            raise ValueError(f"the checkpoint is at step {step}, beyond this config's {total_steps} steps")

    # --- from here on the run folder is written
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(os.path.join(run_dir, "config.json"), cfg.to_dict())
    log = MetricsLog(run_dir, t.tensorboard, start_step=step if ckpt is not None else -1)
    if ckpt is None:
        log.write(
            {
                "step": 0,
                "event": "start",
                "cost": cost.to_dict(),
                "total_steps": total_steps,
                "tokens_per_step": tokens_per_step,
                "device": str(device),
            }
        )

    fwd = torch.compile(model) if t.compile else model
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and t.dtype == "bf16"
        else contextlib.nullcontext()
    )
    eval_dtype = torch.bfloat16 if device.type == "cuda" and t.dtype == "bf16" else None
    eval_bs = t.eval_batch_size or t.batch_size
    aux_weight = cfg.model.moe.aux_loss_weight if cfg.model.ffw == "moe" else 0.0
    params = [p for p in model.parameters() if p.requires_grad]

    def run_eval(max_batches):
        return {
            name: evaluate(model, tf, eval_bs, cfg.model.seq_len, max_batches, device, eval_dtype)
            for name, tf in valid_tfs.items()
        }

    def checkpoint(at_step: int) -> None:
        if not t.checkpoint:
            return
        state = {
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "data": sampler.state_dict(),
            "elapsed": elapsed + time.time() - t_start,
            # the partial log window, so that the first average logged after a resume is exact
            "loss_window": (loss_sum.detach().cpu(), n_loss),
        }
        save_checkpoint(run_dir, at_step, model, state, cfg, tok, keep=t.keep_checkpoints)

    show_bar = progress and os.environ.get("TQDM_DISABLE") != "1"
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=None if show_bar else True,
        dynamic_ncols=True,
        desc=cfg.name or "train",
        unit="step",
    )
    say = bar.write if not bar.disable else print
    print_logs = progress and bar.disable  # no live bar (not a terminal): print the log lines instead
    t_start = time.time()
    t_log, loss_sum, n_loss = time.time(), torch.zeros((), device=device), 0
    if ckpt is not None and "loss_window" in state:
        loss_sum, n_loss = state["loss_window"][0].to(device), state["loss_window"][1]
    model.train()
    while step < total_steps:
        set_lr(optimizer, schedule(step))
        for _ in range(t.grad_accum):
            x, y = next(sampler)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with amp:
                _, loss = fwd(x, y)
                aux = model.aux_loss() if aux_weight else None
                total = loss if aux is None else loss + aux_weight * aux
            (total / t.grad_accum).backward()
            loss_sum += loss.detach().float() / t.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n_loss += 1
        bar.update(1)

        if step % t.log_interval == 0 or step == total_steps:
            now = time.time()
            train_loss = (loss_sum / n_loss).item()
            tok_s = n_loss * tokens_per_step / max(now - t_log, 1e-9)
            rec = {
                "step": step,
                "tokens": step * tokens_per_step,
                "flops": step * tokens_per_step * cost.train_flops,
                "loss": train_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm.item(),
                "tok_per_s": round(tok_s, 1),
                "time": round(elapsed + now - t_start, 2),  # training seconds so far (resumes included)
            }
            log.write(rec)
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if print_logs:
                eta = (total_steps - step) * (now - t_log) / n_loss
                print(
                    f"step {step}/{total_steps} loss {train_loss:.4f} lr {rec['lr']:.2e} "
                    f"tok/s {tok_s:,.0f} eta {eta / 60:.1f} min",
                    flush=True,
                )
            t_log, loss_sum, n_loss = now, torch.zeros((), device=device), 0

        final = step == total_steps
        if (step % t.eval_interval == 0 and not final) and valid_tfs:
            results = run_eval(t.eval_batches)
            log.write({"step": step, "eval": results})
            say(
                f"step {step}: "
                + ", ".join(
                    f"{n} loss {r['loss']:.4f} ppl {r['ppl']:.2f} bpb {r['bpb']:.4f}" for n, r in results.items()
                )
            )
        if step % t.ckpt_interval == 0 and not final:
            checkpoint(step)
        if n_loss == 0:
            t_log = time.time()  # tokens/s measures training only, not evaluation or checkpointing
    bar.close()

    train_seconds = elapsed + time.time() - t_start
    checkpoint(step)
    results = run_eval(None) if valid_tfs else {}  # full validation splits at the end
    log.write({"step": step, "eval": results, "final": True})
    log.close()
    summary = {
        "name": cfg.name,
        "steps": step,
        "tokens": step * tokens_per_step,
        "train_flops": step * tokens_per_step * cost.train_flops,
        "train_seconds": round(train_seconds, 2),
        "total_params": cost.total_params,
        "active_params": cost.active_params,
        "train_flops_per_token": cost.train_flops,
        "valid": results,
    }
    write_json_atomic(os.path.join(run_dir, "summary.json"), summary)
    return summary
