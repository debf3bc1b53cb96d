"""train.expert_lr_final (UltraMem-style value-lr schedule): the expert tables' lr goes linearly from
expert_lr at step 0 to expert_lr_final at the last step, times the lr schedule; every other group
follows the schedule alone; unset, nothing changes."""

import pytest

from tests.lm.helpers import write_config, write_corpus
from torchpeer.lm import Callback
from torchpeer.lm.config import TrainConfig
from torchpeer.lm.config_io import load_config
from torchpeer.lm.optim import ExpertLRRamp, LRSchedule, is_expert_group
from torchpeer.lm.train import train


class LRProbe(Callback):
    """The lr each group trained with at every step ({step: {group name: lr}})."""

    def __init__(self):
        self.seen: dict[int, dict[str, float]] = {}

    def on_step_end(self, trainer, step, metrics):
        # train_step set the lrs before this step's update; step is the count of steps done
        self.seen[step - 1] = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}


def run_lrs(tmp_path, flags) -> dict[int, dict[str, float]]:
    tmp_path.mkdir(exist_ok=True)
    write_corpus(tmp_path, train_lines=300, valid_lines=20)
    cfg = load_config(write_config(tmp_path), flags + ["--data.valid", "{}", "--train.checkpoint", "false"])
    probe = LRProbe()
    train(cfg, str(tmp_path / "run"), progress=False, callbacks=[probe])
    return probe.seen


def test_ramp_values():
    ramp = ExpertLRRamp(total_steps=11, start=4e-3, final=1e-3)
    assert ramp(0) == 1.0 and ramp(5) == pytest.approx(0.625) and ramp(10) == pytest.approx(0.25)
    assert ramp(20) == pytest.approx(0.25)  # held after the last step
    up = ExpertLRRamp(total_steps=3, start=1e-3, final=3e-3)
    assert [up(s) for s in range(3)] == pytest.approx([1.0, 2.0, 3.0])
    assert ExpertLRRamp.from_config(TrainConfig(max_steps=1), 100)(50) == 1.0  # unset: constant
    assert ExpertLRRamp.from_config(TrainConfig(max_steps=1, lr=2e-3, expert_lr_final=1e-3), 2)(1) == 0.5
    assert is_expert_group({"name": "experts"}) and is_expert_group({"name": "experts*2"})
    assert not is_expert_group({"name": "no_decay*3"}) and not is_expert_group({})


def test_applied_lr_at_start_middle_and_end(tmp_path):
    steps = 9
    flags = ["--train.max_steps", str(steps), "--train.lr", "1e-3", "--train.expert_lr", "4e-3"]
    flags += ["--train.expert_lr_final", "1e-3", "--train.schedule", "cosine", "--train.warmup_steps", "2"]
    flags += ["--train.min_lr_ratio", "0.1"]
    seen = run_lrs(tmp_path, flags)
    assert sorted(seen) == list(range(steps))
    sched = LRSchedule("cosine", steps, 2, 0.1, 0.2)
    for s, table in ((0, 4e-3), (4, 2.5e-3), (8, 1e-3)):  # step 0, the middle, the last step
        lrs = seen[s]
        assert lrs["experts"] == pytest.approx(table * sched(s), rel=1e-12), s
        assert lrs["decay"] == pytest.approx(1e-3 * sched(s), rel=1e-12) == lrs["no_decay"]  # the schedule alone
    # with a constant schedule after warmup the applied table lr is the ramp itself
    seen = run_lrs(tmp_path / "c", flags + ["--train.schedule", "constant", "--train.warmup_steps", "0"])
    assert [seen[s]["experts"] for s in (0, 4, 8)] == pytest.approx([4e-3, 2.5e-3, 1e-3], rel=1e-12)
    assert all(seen[s]["decay"] == pytest.approx(1e-3) for s in seen)


def test_unset_keeps_the_tables_at_expert_lr_times_the_schedule(tmp_path):
    seen = run_lrs(tmp_path, ["--train.max_steps", "4", "--train.expert_lr", "2e-3", "--train.warmup_steps", "0"])
    sched = LRSchedule("cosine", 4, 0, 0.1, 0.2)
    assert [seen[s]["experts"] for s in range(4)] == [2e-3 * sched(s) for s in range(4)]  # bit for bit


def test_bad_values():
    for bad in (0.0, -1e-3, float("inf")):
        with pytest.raises(ValueError, match="train.expert_lr_final must be a positive finite number"):
            TrainConfig(max_steps=1, expert_lr_final=bad).validate()


def test_fused_table_optimizer_gets_the_ramped_lr(tmp_path):
    """train.expert_optimizer=rowwise_adam (Triton interpreter on the CPU): the tables are updated in
    the backward with the lr the trainer hands the table optimizer, which carries the ramp too."""
    pytest.importorskip("triton")
    given: list[float] = []

    class Spy(Callback):
        def on_train_start(self, trainer):
            set_lr = trainer.table_optimizer.set_lr

            def spy(lr):
                given.append(lr)
                set_lr(lr)

            trainer.table_optimizer.set_lr = spy

    tmp_path.mkdir(exist_ok=True)
    write_corpus(tmp_path, train_lines=300, valid_lines=20)
    flags = ["--train.expert_optimizer", "rowwise_adam", "--train.max_steps", "3", "--train.checkpoint", "false"]
    flags += ["--model.seq_len", "8", "--train.batch_size", "2", "--data.valid", "{}", "--train.expert_lr", "3e-3"]
    flags += ["--train.expert_lr_final", "1e-3", "--train.schedule", "constant", "--train.warmup_steps", "0"]
    train(load_config(write_config(tmp_path), flags), str(tmp_path / "run"), progress=False, callbacks=[Spy()])
    assert given == pytest.approx([3e-3, 2e-3, 1e-3], rel=1e-12)
