"""Async admission: shed new async queries early while their replies are resumed late.

One Kamailio instance shares one small anonymous mapping (made before Kamailio forks,
so every process sees the same page). The processes that resume replies write into it;
SIP workers read it before each async query:

* every resume reports its lag (when the reply is resumed minus when the request was
  sent, both CLOCK_MONOTONIC, which all processes share);
* every ``INTERVAL`` seconds each resuming process looks at the *shortest* lag it saw
  in that interval. A shortest lag above ``target`` means a standing queue (not a burst):
  the share of new async queries to refuse goes up by ``STEP``. A shortest lag under half
  the target, or an interval without any reply, brings it down by ``STEP / 2``;
* a SIP worker refuses a new async query with that probability (``admit()``), before it
  creates the transaction or sends anything: the caller answers at once (a stateless
  503) instead of queuing a call that would be answered late or not at all.

An overloaded instance thus answers what it can answer in time and refuses the rest
cheaply, instead of spending its CPU on calls that time out (the collapse
bench/compare.py showed at 2.25x the clean rate before this existed).
"""

import mmap
import random
import struct

#: Seconds between two updates of the shed share, per resuming process.
INTERVAL = 0.1
#: How much the shed share moves up per interval with a standing queue.
STEP = 0.1
_SHARE = struct.Struct('@d')


class Admission(object):
    """The shed share of one Kamailio instance (0: admit all, 1: refuse all)."""

    def __init__(self, target):
        if not target > 0:
            raise ValueError('the admission target must be a positive number of seconds')
        self.target = float(target)
        # mmap(-1, ...) is MAP_SHARED | MAP_ANONYMOUS: shared with every forked child.
        self._mm = mmap.mmap(-1, mmap.PAGESIZE)
        self._shortest = None    # this process's shortest lag in the current interval

    @property
    def share(self):
        """The share of new async queries refused now."""
        return _SHARE.unpack_from(self._mm, 0)[0]

    def admit(self):
        """In a SIP worker, before an async query: False to refuse it."""
        share = _SHARE.unpack_from(self._mm, 0)[0]
        return share <= 0.0 or random.random() >= share

    def observe(self, lag):
        """In a resuming process: one reply's lag in seconds."""
        shortest = self._shortest
        if shortest is None or lag < shortest:
            self._shortest = lag

    def update(self):
        """In a resuming process, every INTERVAL seconds: move the share."""
        shortest, self._shortest = self._shortest, None
        share = _SHARE.unpack_from(self._mm, 0)[0]
        if shortest is not None and shortest > self.target:
            share = min(1.0, share + STEP)
        elif shortest is None or shortest < self.target / 2:
            share = max(0.0, share - STEP / 2)
        else:
            return share
        _SHARE.pack_into(self._mm, 0, share)
        return share
