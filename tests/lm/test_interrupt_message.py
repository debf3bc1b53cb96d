"""The first Ctrl-C during training says at once what happens next (a checkpoint of this step, then a
stop; a second Ctrl-C stops at once without it), on rank 0 only; the second stops at once."""

import signal
from types import SimpleNamespace

import pytest

from torchpeer.lm.interrupt import StopOnSignals, TrainingInterrupted


def trainer(rank0: bool = True, in_loop: bool = True):
    return SimpleNamespace(signal_received=None, in_loop=in_loop, step=7, run_dir="nowhere",
                           plan=SimpleNamespace(is_rank0=rank0))  # fmt: skip


def test_the_first_signal_is_announced_and_the_second_stops_at_once(capfd):
    t = trainer()
    handler = StopOnSignals(t)
    handler._handle(signal.SIGINT, None)
    assert t.signal_received == signal.SIGINT
    err = capfd.readouterr().err
    assert "SIGINT: stopping after this step with a checkpoint; a second one stops at once, without it" in err
    with pytest.raises(KeyboardInterrupt):
        handler._handle(signal.SIGINT, None)


def test_other_ranks_stay_quiet_and_a_signal_outside_the_loop_stops_now(capfd):
    t = trainer(rank0=False)
    StopOnSignals(t)._handle(signal.SIGTERM, None)
    assert t.signal_received == signal.SIGTERM and capfd.readouterr().err == ""
    with pytest.raises(TrainingInterrupted) as e:
        StopOnSignals(trainer(in_loop=False))._handle(signal.SIGTERM, None)
    assert e.value.step == 7 and e.value.checkpoint is None and capfd.readouterr().err == ""
