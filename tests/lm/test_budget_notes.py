"""The budget notes a run's start prints: a limit given but pre-empted, a warmup longer than the run."""

from torchpeer.lm.budget import preempted_note, step_budget, warmup_note
from torchpeer.lm.config import RunConfig


def _cfg(**train) -> RunConfig:
    cfg = RunConfig()
    cfg.model.seq_len, cfg.train.batch_size = 128, 16  # 2,048 tokens per step
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_a_given_limit_that_another_pre_empts_is_named_with_its_step():
    cfg = _cfg(max_steps=500, max_tokens=2_000_000, max_flops=1e13)
    assert step_budget(cfg, 8_000_000) == (500, "train.max_steps = 500")
    assert preempted_note(cfg, 8_000_000, {"train.max_tokens"}) == (
        "note: train.max_steps = 500 ends the run at step 500, before train.max_tokens = 2e+06 at 2,048 tokens "
        "per step (step 977) is reached; to train to it, also give --train.max_steps none"
    )
    both = preempted_note(cfg, 8_000_000, {"train.max_tokens", "train.max_flops"})
    assert "(step 977); train.max_flops = 1e+13 (step 610) is reached" in both
    assert preempted_note(cfg, None, {"train.max_flops"}) is None  # no FLOPs per token: not judged
    assert preempted_note(cfg, 8_000_000, {"train.max_steps"}) is None  # the given one decides
    assert preempted_note(_cfg(max_steps=None, max_tokens=2_000_000), 1, {"train.max_tokens"}) is None


def test_a_warmup_longer_than_the_run_says_the_lr_it_reaches():
    cfg = _cfg(max_steps=10, warmup_steps=50, lr=2e-3)
    assert warmup_note(cfg, 10) == (
        "note: train.warmup_steps = 50 is longer than the run's 10 steps: the lr rises to 0.0004 at most, never "
        "train.lr = 0.002; to reach it, give --train.warmup_steps below 10, e.g. 1"
    )
    assert warmup_note(cfg, 50) is None and warmup_note(cfg, 500) is None
