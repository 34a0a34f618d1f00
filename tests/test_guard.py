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


def test_sigusr1_asks_for_a_requeue_whatever_came_first(clock):
    stop = StopRequest()
    stop._handle(signal.SIGTERM, None)
    assert not stop.requeue
    stop._handle(signal.SIGUSR1, None)  # SLURM's notice, after or before the scheduler's SIGTERM
    assert stop.signum == signal.SIGTERM and stop.requeue


class OneRank:
    """The accelerator's reduce over a world of one: the tensor as it is."""

    device = "cpu"

    def reduce(self, tensor, reduction):
        return tensor


def test_the_shared_decision_carries_the_requeue():
    guard_ = guard.StepGuard(OneRank(), StopRequest(), max_bad_steps=0)
    assert guard_.decide() and not guard_.stop_requested
    guard_.stop._handle(signal.SIGUSR1, None)
    assert guard_.decide() and guard_.stop_requested and guard_.requeue_requested
    assert guard_.stop_signal() == signal.SIGUSR1 == guard.REQUEUE_SIGNAL


def test_a_rank_that_saw_no_signal_stops_as_the_job_does():
    guard_ = guard.StepGuard(OneRank(), StopRequest(), max_bad_steps=0)
    guard_.stop_requested = True  # another rank's SIGTERM, through the all-reduce
    assert guard_.stop_signal() == signal.SIGTERM
