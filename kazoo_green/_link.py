"""One broker connection at a time: who reads the socket, who writes, and when it is lost.

A ``Link`` owns one kombu ``Connection`` over a broker list (``_failover.Brokers``: which
broker is tried next, TLS per broker, the time allowed). py-amqp is a blocking library,
so gevent rules apply: at most one greenlet reads the socket (the holder of the read
lock) and writes are serialised by the write lock, frame by frame. Deliveries are
assembled by kazoo_green's own frame handler (``_deliver``) and reach the callbacks
registered with ``consume``. A zone's links are made by ``_zone``.

Two ways to drive it:

* background: ``start()`` runs a ``_reader.Reader``, the one greenlet that drains the
  socket, sends heartbeats and reconnects with back-off; everybody else only waits
  on results the reader fills in. Used by consumer processes.
* caller-driven: with no reader, a greenlet that waits for a reply becomes the
  reader until its result is ready (others wait for it or take over), and a
  lost connection is re-made by the next call. Used in Kamailio SIP workers,
  where nothing runs between two SIP messages.

Nothing here does I/O before first use, so a Link may be built before a fork;
a connection inherited through a fork is dropped without I/O.
"""

import logging
import os
import socket
from time import monotonic

import gevent
from gevent.event import Event
from gevent.lock import RLock
from kombu import Connection

from . import _defaults as D, _pyamqp
from ._amqpfast import FastPath, HookUnavailable
from ._deliver import Consumers, FrameHandler
from ._failover import Brokers, safe_url
from ._reader import Reader
from .errors import ConnectionLost, NotConnected
from .wire import current_pid

__all__ = ['Link']

log = logging.getLogger('kazoo_green')
_warned = set()   # reasons FastPath could not be used, logged once per process


class _Lock(object):
    """gevent's RLock, and whether anybody holds it (``held``): the blocking lane must
    know without taking it (gevent's RLock says so only in versions newer than the
    oldest supported)."""

    __slots__ = ('_lock', 'held')

    def __init__(self):
        self._lock = RLock()
        self.held = 0

    def acquire(self, blocking=True, timeout=None):
        got = self._lock.acquire(blocking, timeout)
        if got:
            self.held += 1
        return got

    def release(self):
        self.held -= 1
        self._lock.release()

    def __enter__(self):
        self._lock.acquire()
        self.held += 1
        return self

    def __exit__(self, typ, value, tb):
        self.held -= 1
        self._lock.release()



class Link(object):
    """One AMQP connection (with failover over ``urls``) shared by greenlets."""

    def __init__(self, name, urls, stats, connect_timeout=D.CONNECT_TIMEOUT,
                 heartbeat=D.HEARTBEAT, poll_interval=D.POLL_INTERVAL,
                 transport_options=None, label='', fast=True, blocking=False, ssl=None,
                 zone=D.ZONE):
        self.name = name
        #: The zone (see _topology) whose broker(s) this link connects to.
        self.zone = zone
        self.label = label
        #: Use the lean frame path (RabbitMQ only); see _amqpfast.
        self.use_fast = fast
        #: Without a background reader, wait with poll(2) instead of gevent's hub
        #: (Kamailio SIP workers: nothing else runs there anyway).
        self.blocking = blocking
        #: Negotiate heartbeats without a background reader: whoever drives the link
        #: calls ``heartbeat_check`` (a resuming process's loop, see _resumeloop).
        self.keepalive = False
        #: The broker list and its failover policy (round-robin, TLS per broker).
        self.brokers = Brokers(urls, ssl, connect_timeout)
        self.urls = self.brokers.urls
        self.stats = stats
        self.connect_timeout = connect_timeout
        self.heartbeat = heartbeat
        self.poll_interval = poll_interval
        self.transport_options = dict(transport_options or {})
        self.memory = self.brokers.memory
        #: Consumers of the current connection: (channel id, tag) -> callback.
        self.consumers = Consumers()
        #: True while connected and every up-hook has run.
        self.connected = False
        #: Bumped at every connect and every loss: an ack or confirm carries
        #: the generation it was made in and is void in any other.
        self.generation = 0
        self.ever_connected = False
        #: ``host:port`` of the broker connected to (or last connected to).
        self.host = None
        #: The broker's host name or address alone, as the C module's events name it.
        self.hostname = None
        self.supports_amqp = False
        self._conn = None
        self._raw = None
        #: The FastPath of the current connection, when used.
        self.fast = None
        self._pid = None
        self._wlock = _Lock()
        self._rlock = _Lock()
        self._connect_lock = RLock()
        self._read_free = Event()
        self._read_free.set()
        self._rpc_waiting = 0
        self._up = Event()
        self._up_hooks = []
        self._on_up = []
        self._on_down = []
        #: The background Reader (``start``); None: caller-driven.
        self._reader = None
        self._lost_once = False
        self._probe_at = None
        self._probe_mark = 0
        #: Exceptions that mean the connection is broken (set per connection).
        self.errors = ()
        self._channel_errors = ()

    # -- configuration --------------------------------------------------
    def add_up_hook(self, fn):
        """``fn(conn)`` runs after each connect, before the link counts as up.

        It may open channels and make synchronous AMQP calls. An exception
        from it fails the connect.
        """
        self._up_hooks.append(fn)

    def on_up(self, fn):
        """``fn(link)`` runs after each connect, once the link is up."""
        self._on_up.append(fn)

    def on_down(self, fn):
        """``fn(link, exc)`` runs once per lost connection, without I/O."""
        self._on_down.append(fn)

    @property
    def channel_errors(self):
        return self._channel_errors

    # -- connecting -----------------------------------------------------
    def _check_pid(self):
        pid = current_pid()
        if self._pid != pid:
            # Inherited through fork: the parent owns that socket; forget it.
            self._conn = self._raw = self.fast = None
            self.connected = False
            self._reader = None
            self._up = Event()
            self._pid = pid

    def _make_connection(self):
        opts = dict(self.transport_options)
        if self.memory:
            opts.setdefault('polling_interval', D.MEMORY_POLLING_INTERVAL)
        else:
            # Shown by rabbitmqctl and the management UI: who holds this connection.
            props = dict(opts.get('client_properties') or {})
            props.setdefault('connection_name', '%s %s %s <%d>' % (
                self.label, self.name, self.zone, os.getpid()))
            opts['client_properties'] = props
            # Deliveries are parsed by kazoo_green (a public py-amqp hook; see _deliver).
            opts['frame_handler'] = FrameHandler.factory(self.consumers)
        conn = Connection(
            self.brokers.kombu_url(),
            failover_strategy='round-robin',
            connect_timeout=self.connect_timeout,
            heartbeat=self.heartbeat if self._reader is not None or self.keepalive else 0,
            transport_options=opts,
        )
        self.errors = tuple(conn.connection_errors) + tuple(conn.channel_errors) + (OSError,)
        self._channel_errors = tuple(conn.channel_errors)
        self.brokers.reset()
        return conn

    def consume(self, channel, queue, tag, callback, no_ack, **kwargs):
        """``basic.consume`` of ``queue`` on ``channel`` as ``tag``; its deliveries go to
        ``callback`` (registered before the broker can deliver anything)."""
        self.consumers[(channel.channel_id, tag)] = callback
        channel.basic_consume(queue=queue, no_ack=no_ack, callback=callback,
                              consumer_tag=tag, **kwargs)

    def cancel(self, channel, tag):
        """``basic.cancel`` of consumer ``tag`` on ``channel`` (through ``rpc``)."""
        channel.basic_cancel(tag)
        self.consumers.pop((channel.channel_id, tag), None)

    def forget_consumer(self, tag):
        """The broker cancelled consumer ``tag``: no more deliveries for it."""
        for key in [key for key in self.consumers if key[1] == tag]:
            del self.consumers[key]

    def ensure(self, deadline=None, wait=False):
        """Be connected when this returns, or raise NotConnected.

        With a background reader, a link that was up once raises at once
        while it is down (the reader is reconnecting); before its first
        connect it waits for it until ``deadline``. Without a reader, the
        caller connects, bounded by ``deadline``.
        """
        if self.connected and self._pid == current_pid():
            if self._reader is not None or self.fast is None:
                return
            if self.fast.has_pending():
                # Caller-driven and the broker sent something since our last read
                # (a connection close, late replies): read it before writing, or a
                # publish could go into a connection the broker already closed.
                self._drain_pending()
            if self._probe_at is not None and self.connected:
                self._judge_probe(deadline)
            if self.connected:
                return
        self._check_pid()
        if self._reader is not None:
            if wait or not self.ever_connected:
                timeout = None if deadline is None else max(0.0, deadline - monotonic())
                self._up.wait(timeout)
            if not self.connected:
                raise NotConnected('%s link: no broker connection (reconnecting to %s)'
                                   % (self.name, self.describe()))
            return
        self.connect(deadline)

    def describe(self):
        return self.brokers.describe()

    def connect(self, deadline=None):
        """Try every broker once, round-robin; raise NotConnected if none answers."""
        with self._connect_lock:
            if self.connected:
                return
            self._check_pid()
            if self._conn is None:
                self._conn = self._make_connection()
            conn = self._conn
            timeout = None
            if deadline is not None:
                timeout = deadline - monotonic()
                if timeout <= 0:
                    raise NotConnected('%s link: no time left to connect' % self.name)
            try:
                with gevent.Timeout(timeout, NotConnected(
                        '%s link: connecting timed out after %.3fs' % (self.name, timeout or 0))):
                    self.brokers.attempt_all(conn, self._connect_failed)
                    raw = conn.connection
                    self.supports_amqp = conn.transport.driver_type == 'amqp'
                    self.consumers.clear()
                    with self._wlock, self._rlock:
                        for hook in self._up_hooks:
                            hook(conn)
            except BaseException as exc:
                self._drop()
                if isinstance(exc, gevent.GreenletExit):
                    raise
                self.stats.connection_errors += 1
                if isinstance(exc, NotConnected):
                    raise
                raise NotConnected('%s link: cannot connect to %s: %s'
                                   % (self.name, self.describe(), exc)) from exc
            self._raw = raw
            self.fast = None
            if self.supports_amqp and self.use_fast:
                self.fast = self._fast_path(raw)
            self.host = conn.host if conn.port else conn.as_uri()
            self.hostname = conn.hostname or self.host
            self.generation += 1
            self.connected = True
            self.stats.connects += 1
            if self.ever_connected or self._lost_once:
                self.stats.reconnects += 1
            self.ever_connected = True
            self._up.set()
            log.info('%s link: connected to %s%s', self.name, safe_url(conn.as_uri()),
                     ' (TLS)' if conn.ssl else '')
        for fn in self._on_up:
            try:
                fn(self)
            except Exception:
                log.exception('%s link: on-connect callback failed', self.name)

    def _fast_path(self, raw):
        """A FastPath on ``raw``, or None (logged once) where it cannot work."""
        if not _pyamqp.supported_version() and 'version' not in _warned:
            _warned.add('version')
            log.warning('py-amqp %s is outside the range kazoo_green is tested with (%s); '
                        'Kazoo(fast=False) avoids its internals', _pyamqp.amqp.__version__,
                        '%s <= version < %s' % tuple('.'.join(map(str, v))
                                                     for v in _pyamqp.SUPPORTED))
        try:
            fast = FastPath(raw, blocking=self.blocking and self._reader is None)
        except HookUnavailable as exc:
            if str(exc) not in _warned:
                _warned.add(str(exc))
                log.warning('%s link: running without the fast frame path: %s',
                            self.name, exc)
            return None
        fast.write_timeout = self.connect_timeout
        return fast

    def send_probe(self, send):
        """Caller-driven, after a wait that heard nothing: ask the broker for an answer.

        ``send`` writes a request the broker must answer. The next ``ensure``
        judges: anything received since means the broker is alive; silence
        past PROBE_GRACE means it is frozen or cut off (no TCP close ever comes),
        so the connection is dropped and the next broker tried.
        """
        if (self._reader is not None or self._probe_at is not None or not self.connected
                or self.fast is None):
            return
        self._probe_mark = self._raw.bytes_recv
        try:
            self.write(send)
        except ConnectionLost:
            return
        self._probe_at = monotonic()

    def _judge_probe(self, deadline):
        """Wait (within ``deadline``) for a sign of life; drop the connection without one."""
        raw, mark = self._raw, self._probe_mark
        expires = self._probe_at + D.PROBE_GRACE
        until = expires if deadline is None else min(expires, deadline)
        waited = self._read_until(lambda: raw.bytes_recv > mark, lambda: until - monotonic())
        if not self.connected or raw is not self._raw:
            return
        if raw.bytes_recv > mark:
            self._probe_at = None
        elif waited and until >= expires:  # heard nothing for the whole grace
            self.lost(ConnectionLost('broker did not answer a probe for %.1fs'
                                     % (monotonic() - self._probe_at)), self.generation)

    def _drain_pending(self):
        """Read what is waiting on the socket, without blocking for more."""
        fast = self.fast
        self._read_until(lambda: not fast.has_pending(), lambda: self.poll_interval)

    def _read_until(self, done, time_left):
        """Be the reader until ``done()``, or ``time_left()`` is spent, or the link dies.

        Returns False at once if another greenlet is reading the socket.
        """
        if not self._rlock.acquire(blocking=False):
            return False
        gen = self.generation
        self._read_free.clear()
        try:
            while not done() and self.connected and gen == self.generation:
                timeout = time_left()
                if timeout <= 0:
                    break
                try:
                    self._drain(timeout)
                except socket.timeout:
                    break
        except self.errors as exc:
            self.lost(exc, gen)
        except Exception as exc:
            self._read_broken(exc, gen)
        finally:
            self._rlock.release()
            self._read_free.set()
        return True

    def read_lane(self, lane):
        """For a caller whose poll(2) found the socket readable (a resume loop): read
        what it has now and handle every whole frame in the buffer, the whole messages
        of ``lane`` straight to it (``FastPath._frames``); TLS may hold more decrypted
        than one read took. Returns False, reading nothing, where that cannot be done
        (no fast path, or another greenlet is reading: the caller reads as usual)."""
        fast = self.fast
        if fast is None or not self._read_free.is_set():
            return False
        gen = self.generation
        try:
            while fast.fill_now():
                fast._frames(-1, lane)
                if not (fast.tls and fast.sock.pending()):
                    break
        except self.errors as exc:
            self.lost(exc, gen)
        except Exception as exc:
            self._read_broken(exc, gen)
        return True

    def _read_broken(self, exc, gen):
        """A bug while reading: logged, and the connection dropped, so the link is never
        left half-dead."""
        log.exception('%s link: unexpected error while reading', self.name)
        self.lost(exc, gen)

    def _connect_failed(self, exc, url):
        self.stats.connection_errors += 1
        log.warning('%s link: cannot connect to %s: %s', self.name, safe_url(url), exc)

    def _drop(self):
        """Forget the current connection without talking to the broker."""
        conn = self._conn
        self._raw = self.fast = self._probe_at = None
        if conn is None:
            return
        try:
            conn.collect()
        except Exception:  # a dying connection may fail in any way here
            pass
        try:
            self.brokers.switch(conn)
        except Exception:
            pass

    def owns(self, channel):
        """Whether ``channel`` is a channel of this link's connection, and it is up: a
        delivery tag of a channel of an earlier connection means nothing on this one."""
        return (self.connected and getattr(channel, 'connection', None) is self._raw
                and getattr(channel, 'is_open', True))

    def lost(self, exc, generation=None, failure=True):
        """The connection of ``generation`` died: drop it, tell everybody once.

        ``failure=False``: dropped on purpose (see ``start``), not counted as an error.
        """
        if generation is not None and generation != self.generation:
            return
        if not self.connected:
            return
        self.connected = False
        self._up.clear()
        self._lost_once = True
        self.generation += 1
        if failure:
            self.stats.connection_errors += 1
            reasons = self.stats.lost_reasons
            reason = type(exc).__name__ if exc is not None else 'closed'
            reasons[reason] = reasons.get(reason, 0) + 1
            log.warning('%s link: lost connection to %s: %s', self.name, self.host,
                        exc or 'closed')
            self._drop()
        else:
            log.info('%s link: %s', self.name, exc)
            conn, self._conn = self._conn, None
            self._raw = self.fast = self._probe_at = None
            try:
                conn.collect()
            except Exception:
                pass
        for fn in self._on_down:
            try:
                fn(self, exc)
            except Exception:
                log.exception('%s link: on-disconnect callback failed', self.name)

    # -- using the socket ----------------------------------------------
    def _drain(self, timeout):
        """Read and handle what arrives within ``timeout`` (caller holds the read lock)."""
        fast = self.fast
        if fast is not None:
            fast.drain(timeout)
        else:
            self._conn.transport.drain_events(self._raw, timeout=timeout)

    def beat(self, gen):
        """Heartbeats of the connection of generation ``gen``: send one if due, raise
        (one of ``errors``) if the broker has been silent for two intervals."""
        with self._wlock:
            # Waiting for the lock let writers run: one may have found the connection
            # dead meanwhile.
            if gen == self.generation and self.connected:
                self._conn.transport.heartbeat_check(self._raw, rate=2)

    def write(self, fn, *args, **kwargs):
        """Call ``fn``, which only writes, with the write lock held."""
        gen = self.generation
        try:
            with self._wlock:
                return fn(*args, **kwargs)
        except self.errors as exc:
            self.lost(exc, gen)
            raise ConnectionLost('%s link: %s' % (self.name, exc)) from exc

    def rpc(self, fn, *args, **kwargs):
        """Call ``fn``, a synchronous AMQP call that reads its answer.

        Channel errors (the broker closed that channel) are raised as they
        are; the link stays up. Connection errors mark the link lost.
        """
        gen = self.generation
        # Lock order everywhere: write lock, then read lock.
        with self._wlock:
            self._rpc_waiting += 1
            try:
                self._rlock.acquire()
            finally:
                self._rpc_waiting -= 1
            self._read_free.clear()
            try:
                if gen != self.generation or not self.connected:
                    raise ConnectionLost('%s link: connection lost' % self.name)
                return fn(*args, **kwargs)
            except self._channel_errors:
                raise
            except self.errors as exc:
                self.lost(exc, gen)
                raise ConnectionLost('%s link: %s' % (self.name, exc)) from exc
            finally:
                self._rlock.release()
                self._read_free.set()

    def wait(self, result, deadline):
        """Wait until ``result`` (an AsyncResult) is ready or ``deadline`` passes.

        Returns whether it is ready. Without a background reader the caller
        reads the socket itself while it waits; a lost connection fails the
        pending results through the on-down callbacks, which makes them ready.
        """
        while not result.ready():
            remaining = deadline - monotonic()
            if remaining <= 0:
                break
            if self._reader is not None or not self.connected:
                result.wait(remaining)
                continue
            if not self._read_until(result.ready, lambda: deadline - monotonic()):
                gevent.wait([result, self._read_free], count=1, timeout=remaining)
        return result.ready()

    def lane(self):
        """The FastPath a blocking caller may write to and read from at once (see
        ``FastPath.ask``), or None when the general path (``ensure``, ``write``,
        ``wait``) must run instead: not a blocking caller-driven link, not connected
        in this process, a probe out, another greenlet holding the write or read lock
        (it waits somewhere), or broker data unread (it may say the connection closed).

        A blocking FastPath waits in poll(2), never in gevent's hub, so no other
        greenlet runs until the caller is done with it: no lock is taken (gevent's
        locks and events are cold code in a SIP worker: see bench/query_cost.py).
        """
        fast = self.fast
        if (fast is None or not fast.blocking or not self.connected or self._reader is not None
                or self._pid != current_pid() or self._probe_at is not None
                or self._wlock.held or self._rlock.held or fast.has_pending()):
            return None
        return fast

    # -- background reader ---------------------------------------------
    def start(self):
        """Spawn the reader greenlet (idempotent)."""
        self._check_pid()
        if self._reader is not None:
            return
        if self.connected:
            # Made by a caller (no reader): without heartbeats, and its FastPath may block
            # the whole process in poll(2). The reader connects again, for background use.
            self.lost(ConnectionLost('connection made for caller-driven use restarted for '
                                     'background use'), failure=False)
        self._conn = None  # rebuilt with heartbeats for background use
        self._reader = Reader(self)

    def stop(self, timeout=5.0):
        """Stop the reader and close the connection."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop(timeout=min(timeout, self.poll_interval * 3))
        if self.connected:
            self.connected = False
            self._up.clear()
            if self.fast is not None:
                self.fast.blocking = False   # its close waits in the hub, within timeout
            conn, self._conn, self._raw = self._conn, None, None
            try:
                with self._wlock:
                    with gevent.Timeout(timeout):
                        conn.release()
            except BaseException:
                try:
                    conn.collect()
                except Exception:
                    pass
