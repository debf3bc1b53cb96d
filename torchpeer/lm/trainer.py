"""The Trainer: build, train step, evaluate, checkpoint; the loop that strings them together.

    trainer = Trainer(cfg, run_dir, resume=False, callbacks=[...], plan=None).build()
    summary = trainer.fit()

build(): validate -> device and runtime (runtime.py) -> run folder checks -> tokenizer and token
    files -> memory estimate (less start_lock.py's reservations) -> model (through the parallel plan) ->
    optimizer, schedule, sampler -> resume -> config.json (+ configs/ history), the metrics log.
train_step(): one optimizer step over ``train.grad_accum`` micro-batches (loss + the FFWs'
    ``aux_loss()`` terms), gradient clipping, lr schedule.
evaluate(max_batches): every valid set -> {name: evaluate() results}.
save_checkpoint() / load_checkpoint(path): exact-resume state (see checkpoint.py); resuming picks the
    newest intact checkpoint and records the config changes (resume.py).
fit(): steps until the budget, logging, periodic eval and checkpoints, then the final checkpoint,
    the full evaluation and summary.json. SIGINT/SIGTERM stop it after the current step with a
    checkpoint (TrainingInterrupted). A resume of a finished run (finished.py) returns its summary.

Seams: callbacks (callbacks.py) watch the run; a parallel plan (plan.py) spreads it over processes.
"""

from __future__ import annotations

import os
import signal
import time

import torch
from tqdm.auto import tqdm

from torchpeer.data.atomic import write_json_atomic
from torchpeer.diagnostics import enable_usage_tracking, window_usage
from torchpeer.layers.registry import sum_aux_losses
from torchpeer.lm import checkpoint as ckpt_io
from torchpeer.lm import resume as resume_io
from torchpeer.lm import runtime
from torchpeer.lm.budget import beyond_budget, step_budget
from torchpeer.lm.callbacks import CallbackList
from torchpeer.lm.config import RunConfig
from torchpeer.lm.config_io import require_run_config
from torchpeer.lm.interrupt import StopOnSignals, TrainingInterrupted
from torchpeer.lm.metrics import MetricsLog
from torchpeer.lm.plan import default_plan
from torchpeer.lm.run_lock import RunFolderLock
from torchpeer.lm.run_messages import format_eval, say_finished, start_lines
from torchpeer.lm.rundir import check_run_folder, check_writable, remove_stale_partials, writing
from torchpeer.lm.start_lock import StartLock


class Trainer:
    """One training run of ``cfg`` in ``run_dir`` (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str,
        resume: bool = False,
        progress: bool = True,
        callbacks=None,
        plan=None,
        init_from=None,
        parent: dict | None = None,
    ):
        """init_from: optional ``fn(model)`` that loads starting weights into the freshly built model
        (every rank, before plan.wrap_model; not when resuming from a checkpoint of this run).
        parent: where those weights stand in their own training ({"step", "tokens", "time"}, e.g. an
        export's origin): written in the start record of metrics.jsonl, so plots draw this run after it."""
        require_run_config(cfg)  # e.g. train("ptb-tiny", ...): one TypeError, not an AttributeError from inside
        self.cfg, self.run_dir, self.resume, self.progress = cfg, run_dir, resume, progress
        self.init_from, self.parent = init_from, parent
        self.callbacks = CallbackList(callbacks)
        self.plan = plan if plan is not None else default_plan()
        self.step, self.elapsed = 0, 0.0
        self.stop_reason: str | None = None
        self.signal_received: int | None = None
        self.in_loop = False  # SIGINT/SIGTERM: before the loop they stop at once, in it after the step
        self._start_lock = StartLock(None)  # build() takes the sweep's: a reservation until the 1st step
        self._folder_lock = RunFolderLock(run_dir)  # not held yet: one trainer per run folder (run_lock.py)

    # ------------------------------------------------------------------------------------ build

    def build(self) -> Trainer:
        """Everything that can fail on bad input happens here, before the run folder is written."""
        from torchpeer.lm.memory import check_fits

        self._start()
        self._build_data()
        self._start_lock = StartLock.from_env()  # the GPU's ledger of starting runs' memory (start_lock.py)
        self.memory = self._start_lock.check(lambda r: check_fits(self.cfg, self.device, reserved=r), say=print)
        self._build_model()
        self._build_optimizer()
        if self.ckpt is not None:
            self.load_checkpoint(self.ckpt)
            if self.step > self.total_steps:
                raise ValueError(beyond_budget(self.step, self.total_steps, self.budget_setting, self.run_dir))
        self._open_run_folder()
        return self

    def _start(self) -> None:
        """The first part of build() (once): input checks, the process group and device, the checkpoint
        to resume from. fit() asks recorded_finish() between it and the rest of the build."""
        if hasattr(self, "device"):
            return
        from torchpeer.data.sources import check_sources
        from torchpeer.lm.model import check_ffw_sections

        self.cfg.validate()
        check_ffw_sections(self.cfg.model)  # a bad [model.<kind>] value fails now, not after the tokenizer
        data = self.cfg.data  # so does a missing data file, of any split
        check_sources({"data.train": data.train, **{f"data.valid.{k}": v for k, v in data.valid.items()}})
        self.device = self.plan.setup(runtime.resolve_device(self.cfg.train.device))
        runtime.check_expert_optimizer(self.cfg.train.expert_optimizer, self.device)
        self._find_checkpoint()

    def recorded_finish(self) -> dict | None:
        """The recorded summary when this resume has nothing to do (the run had finished: finished.py),
        else None; every rank takes the same way. Read before the tokenizer, model and data are built."""
        from torchpeer.lm.finished import recorded_finish

        self._start()
        found = recorded_finish(self.run_dir, self.ckpt, self.cfg)
        if self.plan.any_rank(found is None):  # each rank read the files itself
            return None
        summary, self.step, self.total_steps, self.budget_setting = found
        self._folder_lock.release()  # nothing to train: the folder is free for the next command
        return summary

    def _find_checkpoint(self) -> None:
        """The run folder must be writable; the checkpoint to resume from: the newest intact one, after
        cleaning up partial ones (damaged newer ones are moved aside, resume.py); the config changes."""
        check_writable(self.run_dir)  # a read-only or misnamed run folder fails now, not after the tokenizer
        check_run_folder(self.run_dir)  # e.g. an export-hf folder: its config.json is not ours to replace
        self._folder_lock.hold(self.plan.is_rank0)  # before the cleanup: another run may be writing those
        self.removed_partials = remove_stale_partials(self.run_dir) if self.plan.is_rank0 else []
        self.notes, self.config_changes = [], []
        latest = ckpt_io.latest_checkpoint(self.run_dir)
        if latest is not None and not self.resume:  # a finished run: --resume alone has nothing to do
            from torchpeer.lm.finished import existing_run_error

            raise existing_run_error(self.run_dir, latest, self.cfg)
        self.ckpt, self.notes = resume_io.resume_checkpoint(self.run_dir, move_damaged=self.plan.is_rank0)
        if self.ckpt is not None:
            saved = ckpt_io.read_checkpoint_config(self.ckpt)
            ckpt_io.check_same_model(saved, self.cfg, self.ckpt)
            self.config_changes = resume_io.config_changes(saved, self.cfg)

    def _build_data(self) -> None:
        """Tokenizer (a resumed run keeps the checkpoint's) and token files."""
        from torchpeer.data import load_tokenizer, prepare_splits

        cfg, plan = self.cfg, self.plan
        show = self.progress and plan.is_rank0
        with plan.rank0_first():  # one process trains the tokenizer and writes the token cache
            saved = ckpt_io.load_checkpoint_tokenizer(self.ckpt) if self.ckpt is not None else None
            self.tokenizer = tok = saved or load_tokenizer(cfg.data, show)
            if cfg.model.vocab_size is None:
                cfg.model.vocab_size = tok.vocab_size
            elif cfg.model.vocab_size < tok.vocab_size:
                raise ValueError(
                    f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                    f"({tok.vocab_size}, {tok.name}); omit model.vocab_size to take it from the tokenizer"
                )
            train_tf, self.valid_files = prepare_splits(cfg.data, tok, progress=show)
        self._train_file = train_tf

    def _build_model(self) -> None:
        """Seeds, matmul precision, the model (the plan's; its logit prior), table optimizer, backends, cost, budget."""
        from torchpeer.layers import backend_report
        from torchpeer.lm.info import model_cost
        from torchpeer.lm.logit_prior import init_logit_prior
        from torchpeer.lm.model import TransformerLM
        from torchpeer.lm.optim import attach_table_optimizer

        cfg, t = self.cfg, self.cfg.train
        runtime.setup_runtime(t.seed, self.device)
        self.model = self.plan.build_model(lambda: TransformerLM(cfg.model), self.device)
        if cfg.model.logit_prior == "unigram" and self.ckpt is None:  # a resumed run's bias is in its checkpoint
            init_logit_prior(self.model, self._train_file.tokens)  # every rank counts the same file
        if self.init_from is not None and self.ckpt is None:
            self.init_from(self.model)
        # before DDP and the AdamW groups: the fused table optimizer takes the PEER tables out
        self.table_optimizer = attach_table_optimizer(self.model, t)
        self.wrapped = self.plan.wrap_model(self.model)
        self.forward = torch.compile(self.wrapped) if t.compile else self.wrapped
        self.backends = backend_report(self.model)
        self.cost = model_cost(self.model)
        self.total_steps, self.budget_setting = step_budget(cfg, self.cost.train_flops)
        self.tokens_per_step = t.batch_size * t.grad_accum * cfg.model.seq_len  # global batch
        self.amp_dtype = runtime.autocast_dtype(self.device, t.dtype)

    def _build_optimizer(self) -> None:
        """AdamW groups, the lr schedule, the training sampler and the (empty) log window: with the
        weights, what a checkpoint restores."""
        from torchpeer.data import RandomWindows
        from torchpeer.lm.optim import ExpertLRRamp, LRSchedule, build_optimizer

        t = self.cfg.train
        self.optimizer = build_optimizer(self.model, t, self.device.type)
        self.schedule = LRSchedule(t.schedule, self.total_steps, t.warmup_steps, t.min_lr_ratio, t.decay_frac)
        self.expert_ramp = ExpertLRRamp.from_config(t, self.total_steps)  # train.expert_lr_final
        rank, world = self.plan.data_shard()
        seq_len = self.cfg.model.seq_len
        self.sampler = RandomWindows(self._train_file, t.batch_size, seq_len, t.seed, rank=rank, world_size=world)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self._loss_sum, self._n_loss = torch.zeros((), device=self.device), 0

    def _open_run_folder(self) -> None:
        """config.json (with the backends) and the metrics log; from here on the run folder is written."""
        self.log = None
        if not self.plan.is_rank0:
            return
        with writing(f"the run folder {self.run_dir}"):
            os.makedirs(self.run_dir, exist_ok=True)
            self._folder_lock.hold(self.plan.is_rank0)  # a new folder: locked before anything is written
            config = {**self.cfg.to_dict(), "backends": self.backends}
            resume_io.record_config(self.run_dir, config, self.step)  # config.json + configs/from_step_<N>.json
        resumed = self.ckpt is not None
        self.log = MetricsLog(self.run_dir, self.cfg.train.tensorboard, start_step=self.step if resumed else -1)
        if not resumed:
            start = {"step": 0, "event": "start", "cost": self.cost.to_dict(), "total_steps": self.total_steps}
            start.update(tokens_per_step=self.tokens_per_step, device=str(self.device))
            start.update(world_size=self.plan.world_size, backends=self.backends)
            self.log.write({**start, "parent": self.parent} if self.parent else start)

    # ------------------------------------------------------------------------------- the parts

    def train_step(self) -> dict:
        """One optimizer step; returns {"loss": this step's mean loss, "grad_norm"} (tensors)."""
        from torchpeer.lm.optim import set_lr

        t = self.cfg.train
        multiplier, ramp = self.schedule(self.step), self.expert_ramp(self.step)
        set_lr(self.optimizer, multiplier, ramp)
        if self.table_optimizer is not None:  # the fused table update runs inside the backward below (or after)
            self.table_optimizer.set_lr(t.table_lr * multiplier * ramp)
        step_loss = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            x, y = (v.to(self.device, non_blocking=True) for v in next(self.sampler))
            with self.plan.no_sync(self.wrapped, micro == t.grad_accum - 1):
                with runtime.autocast(self.device, self.amp_dtype):
                    _, loss = self.forward(x, y, loss_chunk_tokens=t.loss_chunk_tokens)
                    aux = sum_aux_losses(self.model)  # the FFWs' weighted aux_loss() terms
                    total = loss if aux is None else loss + aux
                (total / t.grad_accum).backward()
            if self.table_optimizer is not None:  # a shared pool's update, from all its layers' backwards
                self.table_optimizer.step()
            part = loss.detach().float() / t.grad_accum
            self._loss_sum += part  # accumulated in this order so that a resumed log window is bit-exact
            step_loss += part
        max_norm = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = self.plan.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._n_loss += 1
        return {"loss": step_loss, "grad_norm": grad_norm}

    def evaluate(self, max_batches: int | None, progress: bool = False) -> dict:
        """{valid set name: evaluate() results} of the current weights (the first max_batches of each);
        ``progress``: a bar per set (rank 0, when the run shows progress), e.g. for the final full pass."""
        from torchpeer.lm.evaluate import evaluate

        t = self.cfg.train
        bs = t.eval_batch_size or t.batch_size
        seq_len, dev, dtype = self.cfg.model.seq_len, self.device, self.amp_dtype
        show = progress and self.progress and self.plan.is_rank0
        return {
            name: evaluate(
                self.model, tf, bs, seq_len, max_batches, dev, dtype, plan=self.plan, progress=name if show else None
            )
            for name, tf in self.valid_files.items()
        }

    def save_checkpoint(self) -> str | None:
        """Write the checkpoint of the current step (if train.checkpoint); returns its folder."""
        t = self.cfg.train
        if not t.checkpoint:
            return None
        state = {
            "schedule": self.schedule.state_dict(),
            "data": self.sampler.state_dict(),
            "elapsed": self.elapsed + time.time() - self._t_start,
            # the partial log window, so that the first average logged after a resume is exact
            "loss_window": (self._loss_sum.detach().cpu(), self._n_loss),
        }
        if self.table_optimizer is not None:
            state["table_optimizer"] = self.table_optimizer.state_dict()
        where = os.path.join(self.run_dir, "checkpoints", f"step_{self.step:08d}")
        with writing(f"checkpoint {where}"):
            path = self.plan.save_checkpoint(
                self.run_dir, self.step, self.model, self.optimizer, state, self.cfg, self.tokenizer, t.keep_checkpoints
            )
        if self.plan.is_rank0:
            self.callbacks.on_checkpoint(self, path)
        return path

    def load_checkpoint(self, path: str) -> None:
        """Restore weights, optimizer moments, sampler position, RNG states, step and log window."""
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        state = self.plan.load_checkpoint(path, self.model, self.optimizer, self.device)
        for g, f in zip(self.optimizer.param_groups, fresh):
            g.update(f)  # hyper-parameters come from the (possibly edited) config, moments from the file
        self.sampler.load_state_dict(state["data"])
        if self.table_optimizer is not None:
            if "table_optimizer" not in state:
                raise ValueError(f"{path} was trained with train.expert_optimizer=adamw; resume with adamw")
            # the model's checkpoint holds the exact bf16 working tables of the *_bf16 optimizers: keep them
            self.table_optimizer.load_state_dict(state["table_optimizer"], restore_tables=False)
        ckpt_io.set_rng_state(state["rng"])
        self.step, self.elapsed = state["step"], state.get("elapsed", 0.0)
        if "loss_window" in state:
            self._loss_sum, self._n_loss = state["loss_window"][0].to(self.device), state["loss_window"][1]

    def request_stop(self, reason: str) -> None:
        """Stop after the current step and finish normally (final checkpoint, eval, summary)."""
        self.stop_reason = reason

    # ---------------------------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train to the end of the budget (building first if build() was not called); returns the
        summary (also written to summary.json; for a resume of a finished run, the recorded one, and
        nothing is built, trained, evaluated or written). Closes the plan at the end, also on error."""
        try:
            with StopOnSignals(self):
                if not hasattr(self, "model"):
                    recorded = self.recorded_finish()
                    if recorded is not None:  # a resume of a finished run: nothing to train or evaluate
                        say_finished(self)
                        return recorded
                    self.build()
                return self._fit()
        finally:  # also after a failed build: the plan may hold process groups
            self.close()

    def close(self) -> None:
        """Let go of the run folder, start ledger, log and plan (fit() does; a caller of train_step() too)."""
        self._start_lock.release()
        self._folder_lock.release()
        if getattr(self, "log", None) is not None:
            self.log.close()
        self.plan.close()

    def _fit(self) -> dict:
        cfg, t, rank0 = self.cfg, self.cfg.train, self.plan.is_rank0
        show_bar = self.progress and rank0 and os.environ.get("TQDM_DISABLE") != "1"
        opts = dict(disable=None if show_bar else True, dynamic_ncols=True, desc=cfg.name or "train", unit="step")
        bar = tqdm(total=self.total_steps, initial=self.step, **opts)
        say = bar.write if not bar.disable else print
        print_logs = self.progress and rank0 and bar.disable  # not a terminal: print the log lines instead
        if rank0:
            for line in start_lines(self):
                say(line)
            self.callbacks.on_train_start(self)
        self._t_start = t_log = time.time()
        timed = 0  # steps timed since t_log: a resume restores the loss window's steps (_n_loss), not their time
        enable_usage_tracking(self.model, t.track_usage, full=False)  # each log window's usage and KL (config.py)
        self.model.train()
        self.in_loop = True
        while self.step < self.total_steps and self.stop_reason is None:
            out = self.train_step()
            timed += 1
            self._start_lock.release()  # the first step has allocated what this run holds: drop its reservation
            step = self.step
            bar.update(1)
            metrics = {"step": step, "tokens": step * self.tokens_per_step, "lr": self.optimizer.param_groups[0]["lr"]}
            if step % t.log_interval == 0 or step == self.total_steps:
                now = time.time()
                train_loss = self.plan.all_reduce_mean(self._loss_sum / self._n_loss).item()
                tok_s = timed * self.tokens_per_step / max(now - t_log, 1e-9)
                metrics.update(flops=metrics["tokens"] * self.cost.train_flops, loss=train_loss)
                metrics.update(grad_norm=out["grad_norm"].item(), tok_per_s=round(tok_s, 1))
                if t.track_usage:
                    metrics["routing"] = window_usage(self.model, self.plan)
                metrics["time"] = round(self.elapsed + now - self._t_start, 2)  # training seconds (resumes included)
                if rank0:
                    self.log.write(metrics)
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if print_logs:
                    eta = (self.total_steps - step) * (now - t_log) / timed
                    print(
                        f"step {step}/{self.total_steps} loss {train_loss:.4f} lr {metrics['lr']:.2e} "
                        f"tok/s {tok_s:,.0f} eta {eta / 60:.1f} min",
                        flush=True,
                    )
                self._loss_sum, self._n_loss = torch.zeros((), device=self.device), 0
            if rank0:
                self.callbacks.on_step_end(self, step, metrics)

            final = step == self.total_steps
            if step % t.eval_interval == 0 and not final and self.valid_files:
                results = self.evaluate(t.eval_batches)
                if rank0:
                    self.log.write({"step": step, "eval": results})
                    say(f"step {step}: " + format_eval(results))
                    self.callbacks.on_eval(self, step, results)
            if step % t.ckpt_interval == 0 and not final:
                self.save_checkpoint()
            if self.plan.any_rank(self.signal_received is not None) and not final:
                bar.close()
                self._interrupt(say)
            if self._n_loss == 0:
                t_log, timed = time.time(), 0  # tokens/s measures training only, not evaluation or checkpointing
        bar.close()
        return self._finish()

    def _interrupt(self, say) -> None:
        """Checkpoint the current step (unless one was just written) and raise TrainingInterrupted."""
        signum = self.signal_received or signal.SIGINT
        path = None
        if self.cfg.train.checkpoint:
            latest = ckpt_io.latest_checkpoint(self.run_dir)
            done = latest is not None and latest.endswith(f"step_{self.step:08d}")
            path = latest if done else self.save_checkpoint()
        if self.log is not None:
            self.log.write({"step": self.step, "event": "interrupted", "signal": signal.Signals(signum).name})
        raise TrainingInterrupted(signum, self.step, path)

    def _finish(self) -> dict:
        """Final checkpoint, full evaluation, summary.json."""
        train_seconds = self.elapsed + time.time() - self._t_start
        path = self.save_checkpoint()
        if self.signal_received is not None:  # interrupted during the last step: evaluate when resumed
            raise TrainingInterrupted(self.signal_received, self.step, path)
        # A signal during the final evaluation (minutes on a large valid set) stops at once, as during
        # the build: the final checkpoint is written, and a resume evaluates again
        self.in_loop = False
        results = self.evaluate(None, progress=True) if self.valid_files else {}  # the full valid splits
        summary = {
            "name": self.cfg.name,
            "steps": self.step,
            "tokens": self.step * self.tokens_per_step,
            "train_flops": self.step * self.tokens_per_step * self.cost.train_flops,
            "train_seconds": round(train_seconds, 2),
            "total_params": self.cost.total_params,
            "active_params": self.cost.active_params,
            "train_flops_per_token": self.cost.train_flops,
            "world_size": self.plan.world_size,
            "memory": self.memory.against_peak(),  # the estimate beside the allocator's peak (CUDA)
            "valid": results,
        }
        if self.stop_reason is not None:
            summary["stopped"] = self.stop_reason
        if self.plan.is_rank0:
            self.log.write({"step": self.step, "eval": results, "final": True})
            self.callbacks.on_eval(self, self.step, results)
            path = os.path.join(self.run_dir, "summary.json")
            with writing(path):
                write_json_atomic(path, summary)
            self.callbacks.on_train_end(self, summary)
        return summary
