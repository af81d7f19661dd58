"""A link's background reader: the one greenlet that drains its socket, sends heartbeats
and reconnects with back-off (consumer processes; see ``Link.start``).

While it runs, nobody else reads the link's socket: callers only write (under the
link's write lock) and wait for results the reader fills in, except synchronous AMQP
calls (``Link.rpc``), for which the reader steps aside between two reads.
"""

import logging
import socket
from time import monotonic

import gevent

from . import _defaults as D
from .errors import NotConnected

__all__ = ['Reader']

log = logging.getLogger('kazoo_green')

#: Frames read in a row before the reader lets other greenlets run (a backlog
#: streaming in must not starve the workers).
BATCH = 32


class Reader(object):
    """Runs ``link``'s read loop in a greenlet of its own until ``stop``."""

    def __init__(self, link):
        self.link = link
        self.running = True
        self.greenlet = gevent.spawn(self._loop)
        self.greenlet.name = 'kazoo_green-%s-reader' % link.name

    def stop(self, timeout):
        """End the loop (within ``timeout`` seconds, else kill it)."""
        self.running = False
        greenlet = self.greenlet
        greenlet.join(timeout=timeout)
        if not greenlet.dead:
            greenlet.kill(block=True, timeout=1)

    def _loop(self):
        link = self.link
        delay = D.RECONNECT_DELAY
        next_beat = 0.0
        frames = 0
        while self.running:
            if not link.connected:
                try:
                    link.connect()
                except NotConnected:
                    gevent.sleep(delay)
                    delay = min(delay * 2, D.RECONNECT_DELAY_MAX)
                    continue
                delay = D.RECONNECT_DELAY
            gen = link.generation
            try:
                with link._rlock:
                    try:
                        link._drain(link.poll_interval)
                        frames += 1
                    except socket.timeout:
                        frames = 0
                now = monotonic()
                if now >= next_beat:
                    next_beat = now + link.poll_interval
                    link.beat(gen)
            except link.errors as exc:
                link.lost(exc, gen)
                continue
            except gevent.GreenletExit:
                raise
            except Exception as exc:  # a bug must not leave the link half-dead
                log.exception('%s link: unexpected error while reading', link.name)
                link.lost(exc, gen)
                continue
            if link._rpc_waiting or frames >= BATCH:
                # Let a synchronous call take the socket, and let workers run
                # while a backlog streams in.
                frames = 0
                gevent.sleep(0)
