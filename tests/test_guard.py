"""StopRequest: what counts as a second Ctrl-C. The real signals are sent in tests/test_faults.py."""

import signal

import pytest

from resnet_dist import guard
from resnet_dist.guard import SECOND_CTRL_C_AFTER, StopRequest


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(guard.time, "monotonic", lambda: now[0])
    return now


def test_one_ctrl_c_delivered_twice_is_one_request(clock):
    stop = StopRequest()
    stop._handle(signal.SIGINT, None)  # from the terminal
    clock[0] += SECOND_CTRL_C_AFTER / 10
    stop._handle(signal.SIGINT, None)  # the launcher forwarding the same Ctrl-C
    assert stop.signum == signal.SIGINT


def test_a_second_ctrl_c_later_stops_at_once(clock):
    stop = StopRequest()
    stop._handle(signal.SIGINT, None)
    clock[0] += SECOND_CTRL_C_AFTER / 10
    stop._handle(signal.SIGINT, None)
    clock[0] += SECOND_CTRL_C_AFTER
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_after_a_sigterm_the_first_ctrl_c_waits_and_the_second_stops(clock):
    stop = StopRequest()
    stop._handle(signal.SIGTERM, None)  # the scheduler's preemption notice names the stop
    clock[0] += 10 * SECOND_CTRL_C_AFTER
    stop._handle(signal.SIGINT, None)
    assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
    clock[0] += SECOND_CTRL_C_AFTER
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
