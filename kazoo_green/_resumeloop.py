"""A resuming process's body (``kazoo_resumer``): one blocking loop in poll(2) over the
resume queue's connections, each reply resumed inline, acks and heartbeats written from
the same loop.

In a process that only resumes async queries, gevent's hub is overhead: every wake-up
of a reader greenlet (``wait_read``, a timer, two switches) costs ~30 µs of CPU more
than a bare ``poll`` (``bench/wake_cost.py``), and each resume is another switch
to a worker greenlet. Here the process sleeps in ``poll(2)`` on the sockets of the
links it drives (no background ``Reader``: ``Link.keepalive`` negotiates heartbeats
anyway), reads what came in, hands the resume queue's whole messages straight to the
runtime (a ``lane``: no ``Delivered``, no callback chain), which resumes each as it is
parsed, and after each wake-up writes the acks that are due (``AckWindow(timer=False)``).
Everything else is a chore done every ``POLL_CAP`` (0.1 s), replies or not:
reconnects, heartbeats, periodic tasks, and one run of gevent's hub (``gevent.idle``:
the publishing link's reader, timers, whatever ``on_reply`` code spawned), so nothing
else a started runtime runs is starved. With the other processes of Kamailio evicting
the caches between two wake-ups, a hub run costs ~100 µs (libev's fork check, the
watchers, two switches) and each Python function a wake-up touches a few: so a
wake-up does no more than poll, read, resume, ack (``bench/resume_cost.py``).

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

__all__ = ['ResumeLoop', 'POLL_CAP']

log = logging.getLogger('kazoo_green')

#: The longest the loop sleeps in poll(2) (seconds), and how often it does its chores
#: (heartbeats, periodic tasks, one run of gevent's hub for the rest of the process: the
#: publishing link's reader, timers), replies or not.
POLL_CAP = D.POLL_INTERVAL
# The process may be monkey-patched (Kamailio's Python is): the real poll(2), not the hub's.
_poll = monkey.get_original('select', 'poll')
_POLLIN = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


class ResumeLoop(object):
    """Drive ``links`` (kazoo_green Links, no background reader) in this process.

    ``windows``: link -> its current AckWindow (``timer=False``), kept up to date by
    the links' up-hooks; ``periodic``: ``(interval, fn)`` pairs called from the loop
    (never concurrently, an exception logged); ``lanes``: link -> the ``lane`` its
    FastPath hands whole messages of the resume queue's consumer to (see
    ``FastPath._frames``), kept up to date by the up-hooks too.
    """

    def __init__(self, links, windows, periodic=(), lanes=None):
        self.links = list(links)
        self.windows = windows
        self.lanes = {} if lanes is None else lanes
        now = monotonic()
        self._tasks = [[now + interval, interval, fn] for interval, fn in periodic]
        self._retry_at = {link: now for link in self.links}
        self._delay = {link: D.RECONNECT_DELAY for link in self.links}
        self._beat_at = {link: now for link in self.links}
        self._polled = None   # (generation, connected) of each link the poll set is for
        self._by_fd = {}
        self._poller = None
        #: When the chores are due (``_chores``): reconnects, heartbeats, periodic tasks,
        #: the hub, the poll set.
        self._chores_at = now
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
        """Sleep in poll(2) until a socket is readable, an ack is due or the chores
        are; read and resume what came in, write the acks that are due, do the chores
        when due. (What runs on every wake-up is kept to that: with cold caches each
        Python function a wake-up touches costs it microseconds.)"""
        wake = self._chores_at
        windows = self.windows.values()
        for window in windows:
            due = window.due
            if due is not None and due < wake:
                wake = due
        ms = math.ceil((wake - monotonic()) * 1000)
        poller = self._poller
        try:
            if poller is not None:
                events = poller.poll(ms if ms > 0 else 0)
            else:
                events = gevent.sleep(max(0, ms) / 1000.0)
        except InterruptedError:
            events = None
        if events:
            by_fd = self._by_fd
            for fd, _ in events:
                link = by_fd.get(fd)
                if link is not None and link.connected:
                    self._read(link)
                else:   # a connection gone meanwhile: the poll set is stale
                    self._chores_at = 0
        now = monotonic()
        for window in windows:   # full windows flushed themselves
            due = window.due
            if due is not None and now >= due:
                window.flush()
        if now >= self._chores_at:
            self._chores(now)

    def _chores(self, now):
        """Everything but reading and acking, at most every POLL_CAP (sooner when a
        reconnect or a periodic task is due, or a connection was lost): connect the
        links that are down and due, heartbeats, periodic tasks, one run of gevent's
        hub (the rest of the process: the publishing link's reader, timers, what
        ``on_reply`` code spawned), and the poll set brought up to date."""
        for link in self.links:
            if not link.connected and now >= self._retry_at[link]:
                self._connect(link)
        now = monotonic()
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
        gevent.idle()
        now = monotonic()
        at = now + POLL_CAP
        for task in self._tasks:
            if task[0] < at:
                at = task[0]
        for link in self.links:
            if not link.connected and self._retry_at[link] < at:
                at = self._retry_at[link]
        self._chores_at = at
        self._poll_set()

    def _poll_set(self):
        """The poll object over the connected links' sockets, made again when a link's
        connection changed since."""
        key = tuple((link.generation, link.connected) for link in self.links)
        if key == self._polled:
            return
        self._polled = key
        fds = []
        for link in self.links:
            raw = link._raw if link.connected else None
            sock = getattr(getattr(raw, 'transport', None), 'sock', None)
            if sock is not None:
                try:
                    fds.append((sock.fileno(), link))
                except OSError:
                    pass
        self._by_fd = dict(fds)
        self._poller = None
        if fds:
            self._poller = _poll()
            for fd, _ in fds:
                self._poller.register(fd, _POLLIN)

    def _read(self, link):
        """Handle what ``link``'s socket has (and what TLS has buffered), without
        waiting for more: at most a prefetch's worth of replies (the broker sends no
        more until they are acked, after this)."""
        lane = self.lanes.get(link)
        # The usual case: the resume queue's replies straight from the read (read_lane).
        if lane is None or not link.read_lane(lane):
            if link.fast is not None:
                link._drain_pending()
            else:   # py-amqp's own reads (no fast path on this connection): one drain
                once = iter((False,))
                link._read_until(lambda: next(once, True), lambda: link.poll_interval)
        if not link.connected:   # lost: reconnect (and a new poll set) without waiting
            self._chores_at = 0

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
