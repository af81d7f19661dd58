"""A resuming process's body (``kazoo_resumer``): one blocking loop in poll(2) over the
resume queue's connections, each reply resumed inline, acks and heartbeats written from
the same loop.

In a process that only resumes async queries, gevent's hub is overhead: every wake-up
of a reader greenlet (``wait_read``, a timer, two switches) costs ~30 µs of CPU more
than a bare ``poll`` (``bench/wake_cost.py``), and each resume is another switch
to a worker greenlet. Here the process sleeps in ``poll(2)`` on the sockets of the
links it drives (no background ``Reader``: ``Link.keepalive`` negotiates heartbeats
anyway), reads what came in, resumes every reply as it is parsed, and after each
wake-up writes the acks that are due (``AckWindow(timer=False)``); at most every
``HUB_EVERY`` it lets gevent's hub run once (``gevent.idle``: the publishing link's
reader, timers, whatever ``on_reply`` code spawned), so nothing else a started runtime
runs is starved: the poll is bounded by ``POLL_CAP``. (A hub run costs as much as the
rest of a wake-up's loop: libev's fork check, the watchers, two switches.)

Failover is the links' own: a lost connection is dropped (``Link.lost``), reconnected
round-robin with back-off, and its up-hooks declare the queue and consume again; what
was unacked on it is redelivered by the broker, to this process or another.
"""

import logging
import math
import select
from time import monotonic

import gevent
from gevent import monkey

from . import _defaults as D
from .errors import ConnectionLost, NotConnected

__all__ = ['ResumeLoop', 'POLL_CAP', 'HUB_EVERY']

log = logging.getLogger('kazoo_green')

#: The longest the loop sleeps in poll(2) (seconds): gevent's hub runs at least this
#: often for the rest of the process (the publishing link's reader, timers).
POLL_CAP = D.POLL_INTERVAL
#: The hub runs at most this often (seconds) while replies keep the loop awake, and at
#: least every POLL_CAP.
HUB_EVERY = 0.02
# The process may be monkey-patched (Kamailio's Python is): the real poll(2), not the hub's.
_poll = monkey.get_original('select', 'poll')
_POLLIN = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class ResumeLoop(object):
    """Drive ``links`` (kazoo_green Links, no background reader) in this process.

    ``windows``: link -> its current AckWindow (``timer=False``), kept up to date by
    the links' up-hooks; ``periodic``: ``(interval, fn)`` pairs called from the loop
    (never concurrently, an exception logged).
    """

    def __init__(self, links, windows, periodic=()):
        self.links = list(links)
        self.windows = windows
        now = monotonic()
        self._tasks = [[now + interval, interval, fn] for interval, fn in periodic]
        self._retry_at = {link: now for link in self.links}
        self._delay = {link: D.RECONNECT_DELAY for link in self.links}
        self._beat_at = {link: now for link in self.links}
        self._fds = None
        self._by_fd = {}
        self._poller = None
        self._hub_at = now
        self.running = True

    def run(self):
        """Loop until ``stop()``."""
        for link in self.links:
            link.keepalive = True    # heartbeats without a Reader
            link.blocking = True     # its FastPath waits in poll(2), never in the hub
            if link.connected:       # made before, without those: made again
                link.lost(ConnectionLost('connection restarted for the resume loop'),
                          failure=False)
        while self.running:
            self.once()

    def stop(self):
        self.running = False

    # -- one wake-up ---------------------------------------------------
    def once(self):
        now = monotonic()
        for link in self.links:
            if not link.connected and now >= self._retry_at[link]:
                self._connect(link)
        wake = now + POLL_CAP
        for window in self.windows.values():
            if window.due is not None and window.due < wake:
                wake = window.due
        for task in self._tasks:
            if task[0] < wake:
                wake = task[0]
        for link in self.links:
            if not link.connected and self._retry_at[link] < wake:
                wake = self._retry_at[link]
        poller = self._poll_set()
        ms = max(0, math.ceil((wake - monotonic()) * 1000))
        try:
            events = poller.poll(ms) if poller is not None else gevent.sleep(ms / 1000.0)
        except InterruptedError:
            events = None
        if events:
            for fd, _ in events:
                link = self._by_fd.get(fd)
                if link is not None:
                    self._read(link)
        now = monotonic()
        for window in self.windows.values():   # full windows flushed themselves
            if window.due is not None and now >= window.due:
                window.flush()
        for link in self.links:
            if link.connected and now >= self._beat_at[link]:
                self._beat_at[link] = now + link.poll_interval
                gen = link.generation
                try:
                    link.beat(gen)
                except link.errors as exc:
                    link.lost(exc, gen)
        for task in self._tasks:
            if now >= task[0]:
                task[0] = now + task[1]
                try:
                    task[2]()
                except Exception:
                    log.exception('resume loop: periodic task %r failed', task[2])
        if now >= self._hub_at:   # the rest of the process: other links' readers, timers
            self._hub_at = now + HUB_EVERY
            gevent.idle()

    def _poll_set(self):
        """A poll object over the connected links' sockets (rebuilt when they change)."""
        fds = []
        for link in self.links:
            raw = link._raw if link.connected else None
            sock = getattr(getattr(raw, 'transport', None), 'sock', None)
            if sock is not None:
                try:
                    fds.append((sock.fileno(), link))
                except OSError:
                    pass
        key = tuple(fd for fd, _ in fds)
        if key != self._fds:
            self._fds = key
            self._by_fd = dict(fds)
            self._poller = None
            if fds:
                self._poller = _poll()
                for fd, _ in fds:
                    self._poller.register(fd, _POLLIN)
        return self._poller

    def _read(self, link):
        """Handle what ``link``'s socket has (and what TLS has buffered), without
        waiting for more: at most a prefetch's worth of replies (the broker sends no
        more until they are acked, after this)."""
        if link.fast is not None:
            link._drain_pending()
        else:   # py-amqp's own reads (no fast path on this connection): one drain
            once = iter((False,))
            link._read_until(lambda: next(once, True), lambda: link.poll_interval)

    def _connect(self, link):
        try:
            link.connect(monotonic() + link.connect_timeout)
        except NotConnected:
            delay = self._delay[link]
            self._retry_at[link] = monotonic() + delay
            self._delay[link] = min(delay * 2, D.RECONNECT_DELAY_MAX)
            return
        self._delay[link] = D.RECONNECT_DELAY
        self._beat_at[link] = monotonic() + link.poll_interval
