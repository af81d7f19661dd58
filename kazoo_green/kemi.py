"""Kamailio glue (app_python3 / KEMI): fork handling, the consumer process, async queries.

A Kamailio script becomes a few lines::

    import kazoo_green.kemi as kemi

    kz = kemi.Kazoo(os.environ.get('KAZOO_GREEN_BROKERS'), app_name='kamailio')

    class Router(kemi.Handler):
        def ksr_request_route(self, msg):
            reply = kz.query('callmgr', 'route.req', {...})        # SIP worker, blocks
            ...
            kz.async_query('callmgr', 'route.req', {...},          # suspends the transaction
                           on_reply='route_reply', on_timeout='route_timeout')
        def route_reply(self, msg):                                 # resumed in the consumer
            reply = kz.reply()
            ...

    def mod_init():
        return Router(kz)

with, in kamailio.cfg, ``rtimer`` running ``kazoo_consumer`` in a process of its own
(``mode=1``; ``mode=N`` for N processes)::

    modparam("rtimer", "timer", "name=kazoo;interval=1;mode=1;")
    modparam("rtimer", "exec", "timer=kazoo;route=kazoo_consumer")

What runs where (see ../shared/KAMAILIO.md): ``mod_init`` runs once before Kamailio
forks, so building the runtime does no I/O; ``child_init`` calls ``gevent.reinit()`` in
every child; SIP workers use the caller-driven mode (nothing runs there between two SIP
messages); the rtimer process runs the background readers, the event-route workers and
the async resumes forever.

Async queries go through a reply queue shared by the Kamailio instance, named
``<node>-async`` (single active consumer): every process declares it (bound to
``targeted``) before its first request, so a reply always finds it. The SIP worker suspends the transaction, then sends
the consumer process a notice (transaction, methods, deadline) through that queue and
publishes the request. The consumer process resumes the transaction with
``t_continue`` into ``on_reply`` when the reply comes, or into ``on_timeout`` at the
deadline. Resume details also travel in the ``Msg-ID``, so a reply is resumed by
whichever consumer process gets it.
"""

import functools
import logging
import os
import re
from collections import deque
from time import monotonic

import gevent
import gevent.local

from . import _defaults as D, _logs, runtime
from ._kamstats import PUSH_INTERVAL, KamailioStats
from ._query import done_within
from .errors import BadMessage, KazooError
from .wire import dumps, loads_payload, new_msg_id, stamp_received

__all__ = ['Kazoo', 'Handler', 'KSRLogHandler', 'use_kamailio_log']

log = logging.getLogger('kazoo_green')

_METHOD = re.compile(r'[A-Za-z_][A-Za-z0-9_]{0,63}')
_ASYNC_PREFIX = 'kgasync'
# How long a resumed Msg-ID is remembered, to drop a notice that comes after its reply.
_DONE_TTL = 60.0


def _ksr():
    import KSR  # only importable inside Kamailio (or a test's fake)
    return KSR


class KSRLogHandler(logging.Handler):
    """Send Python log records to Kamailio's log with the matching level."""

    def emit(self, record):
        try:
            KSR = _ksr()
            text = self.format(record) + '\n'
            if record.levelno >= logging.ERROR:
                KSR.err(text)
            elif record.levelno >= logging.WARNING:
                KSR.warn(text)
            elif record.levelno >= logging.INFO:
                KSR.info(text)
            else:
                KSR.dbg(text)
        except Exception:  # logging must never break routing
            pass


def use_kamailio_log(level=logging.INFO):
    """Route the ``kazoo_green`` logger to Kamailio's log when running inside it."""
    try:
        _ksr()
    except ImportError:
        return False
    logger = logging.getLogger('kazoo_green')
    if not any(isinstance(h, KSRLogHandler) for h in logger.handlers):
        handler = KSRLogHandler()
        handler.setFormatter(logging.Formatter('kazoo_green: %(message)s'))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
    return True


class _Resume(gevent.local.local):
    reply = None
    error = None


def _counted(method):
    """``method`` of runtime.Kazoo, then this process's statistics stored (Kamailio)."""
    @functools.wraps(method)
    def counted(self, *args, **kwargs):
        stats = self.kamailio_stats
        if not stats._checked:
            stats.check()
        try:
            return method(self, *args, **kwargs)
        finally:
            stats.write()
    return counted


class Kazoo(runtime.Kazoo):
    """A runtime with Kamailio's async query (suspend/resume) on top."""

    def __init__(self, brokers=None, **kwargs):
        kwargs.setdefault('app_name', 'kamailio')
        # SIP workers wait for replies in poll(2): nothing else runs there anyway.
        kwargs.setdefault('blocking', True)
        super(Kazoo, self).__init__(brokers, **kwargs)
        self.async_queue = '%s-async' % self.node
        self._resume = _Resume()
        self._async_pending = {}   # Msg-ID -> its deadline's timer
        self._async_sent = {}      # Msg-ID -> (exchange, when it was sent)
        self._async_done = set()   # Msg-IDs resumed in the last _DONE_TTL seconds
        self._async_done_order = deque()  # (time, Msg-ID), oldest first
        self._consuming_async = False
        #: This process's share of Kamailio's ``kazoo_green`` statistics.
        self.kamailio_stats = KamailioStats(self)
        self._pub_link.add_up_hook(self._declare_async_queue)
        # Every consuming link of the primary zone (one per broker of a standalone zone:
        # a reply may come through any of them).
        for feed in self.zones[self.zone].feeds:
            feed.link.add_up_hook(self._async_consumer(feed.link))

    # -- both sides -----------------------------------------------------
    def _declare_async_queue(self, conn, channel=None):
        """Declare and bind the instance's async queue: on ``channel`` and waiting for
        the broker (consumer side), or else (SIP workers, where it is only there so the
        first replies find it) on a channel of its own, waiting at most
        REPLY_QUEUE_WAIT: a cluster with a frozen node stalls declarations, and sync
        queries on this connection must not wait for that."""
        wait = channel is not None or not self._pub_link.supports_amqp
        channel = channel or (conn.channel() if not wait else self._publisher.channel)
        # Single active consumer: with several consumer processes (rtimer mode=N) the
        # notice and the reply of one query still reach the same process, the one that
        # holds its timer; another takes over if that one goes away.
        channel.queue_declare(queue=self.async_queue, durable=False, exclusive=False,
                              auto_delete=False, nowait=not wait,
                              arguments={'x-single-active-consumer': True})
        channel.queue_bind(queue=self.async_queue, exchange=self._replies.targeted_exchange,
                           routing_key=self.async_queue, nowait=not wait)
        if not wait and not done_within(channel, D.REPLY_QUEUE_WAIT):
            self._stats.reply_queue_late += 1
            log.warning('async queue %s not confirmed by the broker within %.1fs (a '
                        'stalled cluster node?)', self.async_queue, D.REPLY_QUEUE_WAIT)

    # -- SIP worker side ------------------------------------------------
    query = _counted(runtime.Kazoo.query)
    publish = _counted(runtime.Kazoo.publish)

    def async_query(self, exchange, routing_key, payload, on_reply, on_timeout,
                    timeout=None, headers=None):
        """Suspend the current transaction and query; resume into a method of the handler.

        ``on_reply`` runs (in the consumer process) when the reply arrives: read it with
        ``reply()``. ``on_timeout`` runs when none came within ``timeout`` seconds, or at
        once (in this process) if the request could not be sent; ``reply_error()`` says
        why. Returns the request's Msg-ID. Raises KazooError if the transaction cannot be
        suspended (nothing was sent then).
        """
        for name in (on_reply, on_timeout):
            if not isinstance(name, str) or not _METHOD.fullmatch(name):
                raise ValueError('on_reply/on_timeout must be method names, not %r' % (name,))
        timeout = self._timeout(timeout, self.query_timeout)
        message = self._message(payload)
        KSR = _ksr()
        self.kamailio_stats.check()
        if KSR.tm.t_newtran() < 0:
            raise KazooError('cannot create the transaction for an async query')
        index = int(KSR.pv.get('$T(id_index)'))
        label = int(KSR.pv.get('$T(id_label)'))
        if KSR.tmx.t_suspend() < 0:
            raise KazooError('cannot suspend the transaction for an async query')
        deadline_ms = int((monotonic() + timeout) * 1000)
        msg_id = '%s:%d:%d:%s:%s:%d:%s' % (_ASYNC_PREFIX, index, label, on_reply, on_timeout,
                                           deadline_ms, new_msg_id())
        message['Msg-ID'] = msg_id
        message['Server-ID'] = self.async_queue
        props = {'correlation_id': msg_id, 'reply_to': self.async_queue}
        self._stats.queries += 1   # as query(): every one asked, sent or not
        try:
            deadline = monotonic() + timeout
            # Check the exchange first: a notice for a request that cannot go out would
            # make the consumer resume this transaction a second time.
            self._pub_link.ensure(deadline)
            self._publisher.verify(exchange)
            # Notice first, in the same write: the consumer process must hold the
            # transaction before the reply can come.
            self._publisher.send_together((
                ('', self.async_queue, dumps({'kg-async': msg_id, 'kg-exchange': exchange,
                                              'kg-sent': int(monotonic() * 1000000)}),
                 None, None, False),
                (exchange, routing_key, dumps(message), headers, props, False)))
        except KazooError as exc:
            self._stats.queries_failed += 1
            log.warning('async query to %r/%r not sent: %s', exchange, routing_key, exc)
            self._continue(index, label, on_timeout, None, 'not sent: %s' % exc)
        self.kamailio_stats.write()
        return msg_id

    def reply(self):
        """In an ``on_reply`` method: the reply payload (a dict); None elsewhere."""
        return self._resume.reply

    def reply_error(self):
        """In an ``on_timeout`` method: why there is no reply (text); None elsewhere."""
        return self._resume.error

    def _continue(self, index, label, method, reply, error, expected=True):
        """t_continue into ``method``; returns whether the transaction was resumed.

        ``expected=False`` (timeouts): another consumer process may have resumed the
        transaction with its reply already, so a refusal is normal there.
        """
        resume = self._resume
        resume.reply, resume.error = reply, error
        try:
            if _ksr().tmx.t_continue(index, label, method) < 0:
                log.log(logging.WARNING if expected else logging.DEBUG,
                        't_continue(%d, %d, %s) refused: transaction no longer suspended',
                        index, label, method)
                return False
            return True
        except Exception:
            log.exception('resuming transaction %d:%d into %s failed', index, label, method)
            return False
        finally:
            resume.reply = resume.error = None

    def _time_out(self, index, label, method):
        if self._continue(index, label, method, None, 'timeout', expected=False):
            self._stats.queries_timeout += 1

    # -- consumer process side -----------------------------------------
    def _async_consumer(self, link):
        def consume_async_queue(conn):
            if not self._consuming_async:
                return
            channel = conn.channel()
            self._declare_async_queue(conn, channel)
            link.consume(channel, self.async_queue, 'kg-async', self._on_async_message, True)
        return consume_async_queue

    def _on_async_message(self, message):
        """Runs in the reading greenlet: hand every resume to a worker. Never raises."""
        try:
            bad = getattr(message, 'bad', None)
            if bad:
                raise BadMessage(bad)
            payload = loads_payload(message.body)
        except BadMessage as exc:
            # Which transaction it was for is unknown (or untrusted): it is resumed into
            # on_timeout at its deadline.
            self._stats.bad_input += 1
            _logs.bad_input.warning('bad message on %s (%d bytes): %s', self.async_queue,
                                    len(message.body or b''), exc)
            return
        stamp_received(payload, self.zone)   # as consumed messages and sync replies
        notice = payload.get('kg-async')
        if notice is not None:
            if isinstance(notice, str):
                self._on_notice(notice, payload.get('kg-exchange'), payload.get('kg-sent'))
            return
        msg_id = message.properties.get('correlation_id') or payload.get('Msg-ID')
        info = _parse_async_id(msg_id)
        if info is None:
            self._stats.replies_unmatched += 1
            _logs.bad_input.warning('reply on %s without an async Msg-ID: %s',
                                    self.async_queue, _logs.short(msg_id))
            return
        self._finish(msg_id, info, payload)

    def _on_notice(self, msg_id, exchange=None, sent=None):
        info = _parse_async_id(msg_id)
        if info is None or msg_id in self._async_done:
            return
        delay = max(0.0, info[4] - monotonic())
        old = self._async_pending.pop(msg_id, None)
        if old is not None:
            old.close()
        timer = gevent.get_hub().loop.timer(delay)
        timer.start(self._expired, msg_id)
        self._async_pending[msg_id] = timer
        if isinstance(exchange, str) and isinstance(sent, int):
            # For the query_seconds histogram: the SIP worker's clock (CLOCK_MONOTONIC is
            # one clock for every process of the machine).
            self._async_sent[msg_id] = (exchange, sent / 1000000.0)

    def _expired(self, msg_id):
        """A hub callback: must not block, so the resume goes to a worker."""
        timer = self._async_pending.pop(msg_id, None)
        if timer is None:
            return
        timer.close()
        self._async_sent.pop(msg_id, None)
        info = _parse_async_id(msg_id)
        self._mark_done(msg_id)
        self.dispatcher.submit(self._time_out, (info[0], info[1], info[3]))

    def _finish(self, msg_id, info, payload):
        index, label, on_reply, on_timeout, deadline = info
        timer = self._async_pending.pop(msg_id, None)
        if timer is not None:
            timer.close()
        sent = self._async_sent.pop(msg_id, None)
        if msg_id in self._async_done:
            self._stats.replies_unmatched += 1  # a second reply, or after the timeout
            return
        self._mark_done(msg_id)
        if monotonic() > deadline:
            self._stats.replies_unmatched += 1
            self.dispatcher.submit(self._time_out, (index, label, on_timeout))
            return
        self._stats.queries_ok += 1
        if sent is not None:
            self._stats.observe('query_seconds', sent[0], monotonic() - sent[1])
        self.dispatcher.submit(self._continue, (index, label, on_reply, payload, None))

    def _mark_done(self, msg_id):
        done, order = self._async_done, self._async_done_order
        now = monotonic()
        while order and now - order[0][0] > _DONE_TTL:  # oldest first: O(1) each
            done.discard(order.popleft()[1])
        done.add(msg_id)
        order.append((now, msg_id))

    def after_fork(self):
        """In ``child_init``: nothing inherited from the parent is used (no I/O here)."""
        self._async_pending = {}
        self._async_sent = {}
        self._async_done = set()
        self._async_done_order = deque()
        self.kamailio_stats.forked()

    def stop(self, timeout=None):
        self.kamailio_stats.stop()
        pending, self._async_pending = self._async_pending, {}
        self._async_sent = {}
        for timer in pending.values():
            timer.close()
        if timeout is None:
            super(Kazoo, self).stop()
        else:
            super(Kazoo, self).stop(timeout)

    def run_consumer(self):
        """The consumer process's body (from rtimer): never returns."""
        self._consuming_async = True
        self.kamailio_stats.check()
        self.start()
        for feed in self.zones[self.zone].feeds:
            feed.link.start()  # the async reply queue needs them even without subscriptions
        while True:
            gevent.sleep(PUSH_INTERVAL)
            self.kamailio_stats.tick()


def _parse_async_id(msg_id):
    """(index, label, on_reply, on_timeout, deadline) from an async Msg-ID, or None."""
    if not isinstance(msg_id, str) or not msg_id.startswith(_ASYNC_PREFIX + ':'):
        return None
    parts = msg_id.split(':')
    if len(parts) != 7:
        return None
    if not (_METHOD.fullmatch(parts[3]) and _METHOD.fullmatch(parts[4])):
        return None   # only handler methods named as async_query allows are resumed into
    try:
        return int(parts[1]), int(parts[2]), parts[3], parts[4], int(parts[5]) / 1000.0
    except ValueError:
        return None


class Handler(object):
    """Base of the object ``mod_init()`` returns: fork handling and the consumer loop."""

    def __init__(self, kz, log_level=logging.INFO):
        self.kz = kz
        use_kamailio_log(log_level)

    def child_init(self, rank):
        gevent.reinit()
        self.kz.after_fork()
        return 0

    def kazoo_consumer(self, msg, evname=None):
        """Name this in rtimer (``route=kazoo_consumer``): runs the consumer forever."""
        log.info('consumer process %d started', os.getpid())
        self.kz.run_consumer()
        return 1
