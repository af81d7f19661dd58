"""kazoo_green._acks: the resume queue's acks, written several at a time and in tag order.

A fake link and channel record what would be written; tests/e2e/test_kamailio.py shows a
real RabbitMQ taking these acks (nothing left unacked after the calls).
"""

import gevent.event
import pytest

from kazoo_green._acks import AckWindow
from kazoo_green._link import Link
from kazoo_green.errors import ConnectionLost


class FakeChannel(object):
    channel_id = 3

    def __init__(self, link):
        self.connection = link.raw
        self.acks = []
        self.written = gevent.event.Event()

    def basic_ack(self, tag, multiple):
        self.acks.append((tag, multiple))
        self.written.set()


class FakeLink(object):
    """Link.owns as kazoo_green._link has it, on a fake connection."""
    connected = True
    fast = None
    error = None

    def __init__(self):
        self.raw = object()

    owns = Link.owns
    _raw = property(lambda self: self.raw)

    def write(self, fn, *args):
        if self.error is not None:
            raise self.error
        return fn(*args)


@pytest.fixture
def link():
    return FakeLink()


@pytest.fixture
def channel(link):
    return FakeChannel(link)


def window(channel, batch=3, delay=30.0, link=None, on_error=None):
    return AckWindow(link, channel, batch, delay, on_error)


def test_a_full_batch_is_one_ack_of_every_tag_up_to_the_last(link, channel):
    w = window(channel, link=link)
    for tag in (1, 2):
        w.done(tag)
    assert channel.acks == [] and w.pending == 2
    w.done(3)
    assert channel.acks == [(3, True)] and w.pending == 0


def test_a_tag_is_not_acked_while_an_earlier_one_is_still_resumed(link, channel):
    w = window(channel, link=link)
    for tag in (2, 3, 4, 5):        # 1 is still being resumed
        w.done(tag)
    w.flush()
    assert channel.acks == [] and w.pending == 0
    w.done(1)                       # 1..5 done: 5 pending, over the batch
    assert channel.acks == [(5, True)]


def test_the_delay_acks_what_is_pending_without_more_deliveries(link, channel):
    w = window(channel, batch=100, delay=0.01, link=link)
    w.done(1)
    w.done(2)
    assert channel.written.wait(10), 'no ack after the delay'
    assert channel.acks == [(2, True)] and w.pending == 0


def test_a_flush_cancels_the_delayed_ack_and_nothing_is_acked_twice(link, channel):
    w = window(channel, batch=2, delay=0.01, link=link)
    w.done(1)                       # arms the delayed ack
    w.done(2)                       # the batch: acked now
    w.done(2)                       # a bug elsewhere: ignored, not a second ack
    gevent.sleep(0.05)              # past the delay: the cancelled ack must not come
    assert channel.acks == [(2, True)]


def test_nothing_is_written_on_a_lost_or_replaced_connection(link, channel):
    w = window(channel, batch=1, link=link)
    link.connected = False
    w.done(1)
    link.connected, link.raw = True, object()   # reconnected: tag 2 is not this channel's
    w.done(2)
    channel.connection = link.raw
    channel.is_open = False
    w.done(3)
    assert channel.acks == []


def test_a_failed_write_is_reported_not_raised(link, channel):
    errors = []
    link.error = ConnectionLost('link: gone')
    w = window(channel, batch=1, link=link, on_error=errors.append)
    w.done(1)
    assert errors == [link.error] and channel.acks == []


def test_the_fast_path_writes_one_multiple_ack_frame(link, channel):
    class Fast(object):
        frames = []

        def ack(self, channel_id, tag, multiple):
            self.frames.append((channel_id, tag, multiple))
    link.fast = Fast()
    w = window(channel, batch=2, link=link)
    w.done(1)
    w.done(2)
    assert link.fast.frames == [(3, 2, True)] and channel.acks == []
