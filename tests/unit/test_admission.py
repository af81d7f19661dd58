"""kazoo_green._admission: the shed share that SIP workers read and resuming processes move."""

import os
import random

import pytest

from kazoo_green._admission import STEP, Admission


def test_a_standing_lag_raises_the_share_a_step_per_interval_up_to_all():
    a = Admission(0.1)
    for n in range(1, 4):
        a.observe(0.5)
        a.observe(0.2)          # the quickest reply of the interval counts
        assert a.update() == pytest.approx(min(1.0, n * STEP))
    for _ in range(20):
        a.observe(0.3)
        a.update()
    assert a.share == 1.0 and not any(a.admit() for _ in range(100))


def test_a_burst_with_one_quick_reply_is_not_a_standing_queue():
    a = Admission(0.1)
    a.observe(0.9)
    a.observe(0.01)
    assert a.update() == 0.0 and a.admit()


def test_quick_replies_or_none_at_all_bring_the_share_down_by_half_steps():
    a = Admission(0.1)
    for _ in range(4):
        a.observe(1.0)
        a.update()
    assert a.share == pytest.approx(4 * STEP)
    a.observe(0.01)
    assert a.update() == pytest.approx(3.5 * STEP)
    assert a.update() == pytest.approx(3 * STEP)     # nothing resumed: everything shed?
    a.observe(0.07)                                  # between half the target and it: hold
    assert a.update() == pytest.approx(3 * STEP)
    for _ in range(20):
        a.update()
    assert a.share == 0.0


def test_admit_refuses_about_the_share():
    a = Admission(0.1)
    for _ in range(5):
        a.observe(1.0)
        a.update()
    random.seed(7)
    admitted = sum(a.admit() for _ in range(10000))
    assert 4500 < admitted < 5500, admitted


def test_the_share_is_shared_with_forked_processes():
    a = Admission(0.1)
    pid = os.fork()
    if pid == 0:   # a resuming process
        try:
            a.observe(1.0)
            a.update()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    assert a.share == pytest.approx(STEP)


@pytest.mark.parametrize('target', [0, -1, None])
def test_the_target_must_be_positive(target):
    with pytest.raises((ValueError, TypeError)):
        Admission(target)
