"""torchpeer sweep's signal handling (experiments/sweep_command.py): SIGTERM stops it as Ctrl-C does,
SIGINT too when it was started with SIGINT ignored, only the first signal counts, and the handlers
before are back afterwards (a sweep run in-process leaves the caller's handlers alone)."""

import os
import signal
import time

import pytest

from torchpeer.experiments.sweep_command import SweepStopped, stop_on_signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_stops_later_ones_are_ignored_handlers_restored(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job of a script
    try:
        with pytest.raises(SweepStopped) as e, stop_on_signals():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises here, at once
        assert e.value.signum == sig and isinstance(e.value, KeyboardInterrupt)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # what it was before the sweep
        with stop_on_signals():  # a second signal while the first is handled: ignored, not raised again
            with pytest.raises(SweepStopped):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises here, at once
            os.kill(os.getpid(), signal.SIGINT)  # no exception: ignored after the first
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert {s: signal.getsignal(s) for s in before} == before


def test_off_the_main_thread_it_leaves_handlers_alone():
    """signal.signal raises ValueError off the main thread: a sweep run from a worker thread must
    still run (its body executes) and leave the handlers as they were."""
    import threading

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    seen = []

    def worker():
        try:
            with stop_on_signals():
                seen.append({s: signal.getsignal(s) for s in before})
        except Exception as e:  # noqa: BLE001 - the failure under test
            seen.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert seen == [before]
