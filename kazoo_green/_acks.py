"""Acknowledging one channel's deliveries in as few frames as their order allows.

The resume queue's deliveries are acked after their resume, each exactly once (resumed,
late, a second copy or bad). Writing one ``basic.ack`` per delivery costs a consuming
process a TCP send per reply (the largest item of py-spy's samples there); one
``basic.ack`` with ``multiple`` acks every delivery up to its tag. So an ``AckWindow``
counts the deliveries done in tag order and writes an ack when ``batch`` of them are
pending, or ``delay`` seconds after the first of them, whichever is first. A tag is only
ever acked once every earlier tag of the channel is done: a delivery still being resumed
is never acked (the process dying then leaves it to the broker to deliver to another).
"""

import logging
from time import monotonic

import gevent

from .errors import KazooError

log = logging.getLogger('kazoo_green')


class AckWindow(object):
    """The acks of one consuming channel (delivery tags 1, 2, ... as the broker counts)."""

    __slots__ = ('link', 'channel', 'batch', 'delay', 'on_error', 'timer', 'due', '_acked',
                 '_contiguous', '_done', '_timer')

    def __init__(self, link, channel, batch, delay, on_error=None, timer=True):
        self.link = link
        self.channel = channel
        self.batch = batch
        self.delay = delay
        self.on_error = on_error    # called with the KazooError of a failed write
        #: False: no timer greenlet; whoever drives the process calls ``flush`` once
        #: ``due`` (monotonic seconds; None: nothing waits) has passed (_resumeloop).
        self.timer = timer
        self.due = None
        self._acked = 0             # every tag <= _acked is acked on the wire
        self._contiguous = 0        # every tag <= _contiguous is done
        self._done = set()          # done tags above _contiguous (finished out of order)
        self._timer = None

    @property
    def pending(self):
        """Deliveries done but not acked yet (in order)."""
        return self._contiguous - self._acked

    def done(self, tag):
        """Delivery ``tag`` of this channel is finished with. Never raises."""
        if tag <= self._contiguous or tag in self._done:
            return      # twice (a bug elsewhere): acking it again would close the channel
        if tag != self._contiguous + 1:
            self._done.add(tag)
            return
        done, last = self._done, tag
        while done and last + 1 in done:
            last += 1
            done.discard(last)
        self._contiguous = last
        if self._contiguous - self._acked >= self.batch:
            self.flush()
        elif not self.timer:
            if self.due is None:
                self.due = monotonic() + self.delay
        elif self._timer is None:
            self._timer = gevent.spawn_later(self.delay, self._flush_later)

    def _flush_later(self):
        self._timer = None
        self.flush()

    def flush(self):
        """Write the ack of every delivery done so far. Never raises."""
        timer, self._timer = self._timer, None
        self.due = None
        if timer is not None:   # None in the timer's own greenlet: _flush_later cleared it
            timer.kill(block=False)
        tag = self._contiguous
        if tag <= self._acked:
            return
        link, channel = self.link, self.channel
        if not link.owns(channel):
            return   # the broker requeued them with the channel: another process resumes them
        self._acked = tag
        try:
            fast = link.fast
            if fast is not None:
                link.write(fast.ack, channel.channel_id, tag, True)
            else:
                link.write(channel.basic_ack, tag, True)
        except KazooError as exc:
            if self.on_error is not None:
                self.on_error(exc)
            else:
                log.warning('cannot ack deliveries up to %d: %s', tag, exc)
