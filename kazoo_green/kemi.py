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

Async queries: the SIP worker creates the transaction, arms tm's own timer for it
(``t_set_fr``, the query's timeout) with a failure route that resumes into ``on_timeout``,
suspends it (``t_suspend``) and publishes the request, one message. Everything a resume
needs travels in the request's ``Msg-ID`` (transaction, methods, deadline, when it was
sent), so the reply alone is enough: it comes back through the instance's queue
``<node>-resume`` (bound to ``targeted``, declared by every process before its first
request), which every consumer process reads (``kazoo_consumer`` unless
``resume_in_consumer=False``, and any number of ``kazoo_resumer`` processes: ``rtimer``
``mode=N``, each one blocking loop without gevent's hub: ``_resumeloop``); the broker
spreads the replies
over them (acks after the resume, several in one frame: ``_acks``; a bounded prefetch:
a busy process gets no more, a dead one's are redelivered to another). A reply after its deadline is not resumed (tm
answered it through ``on_timeout``; counted ``async_late``). No reply: tm's timer fires
in its own process and the failure route runs ``on_timeout``, whether or not a consumer
process is alive. While replies are resumed late, a share of new async queries is
refused with ``Overloaded`` before anything is done (``_admission``; ``shed_lag=``).
"""

import functools
import logging
import os
import re
import sys
from collections import deque
from time import monotonic

import gevent
import gevent.local

from . import _defaults as D, _logs, runtime
from ._acks import AckWindow
from ._amqpfast import encode_request
from ._admission import INTERVAL as ADMISSION_INTERVAL, Admission
from ._kamstats import PUSH_INTERVAL, KamailioStats
from ._query import done_within
from ._resumeloop import POLL_CAP, ResumeLoop
from .errors import BadMessage, ConnectionLost, KazooError, Overloaded
from .wire import dumps, loads_payload, new_token, stamp_received

__all__ = ['Kazoo', 'Handler', 'KSRLogHandler', 'use_kamailio_log']

log = logging.getLogger('kazoo_green')

# No Python thread may live in a Kamailio process: app_python3 (threads_mode 0, the only
# mode before Kamailio 6.0) keeps the GIL while Kamailio's C code runs, so a thread
# waits for it forever and, while it waits, wakes every switch interval (5 ms) to ask
# for it: idle CPU in every process, and a GIL hand-over forced into the main thread's
# Python code under load. gevent's default resolver is such a thread (its threadpool),
# started by the first getaddrinfo, numeric host or not (py-amqp's connect). c-ares
# resolves in the process's own loop instead. GEVENT_RESOLVER, if set, still decides.
if not os.environ.get('GEVENT_RESOLVER'):
    gevent.config.resolver = 'ares'

_METHOD = re.compile(r'[A-Za-z_][A-Za-z0-9_]{0,63}')
#: (on_reply, on_timeout) pairs already found to be valid method names (``async_query``
#: checks its arguments, the resuming side a Msg-ID's; a handler has a few; bounded all
#: the same: a Msg-ID comes from the network).
_VALID_PAIRS = set()
_VALID_PAIRS_MAX = 256
_ASYNC_PREFIX = 'kgasync'
#: The failure route tm runs at an async query's deadline: ``Handler`` resolves
#: ``kazoo_timeout_<on_timeout>`` to a call of ``on_timeout`` with ``reply_error()`` set.
_TIMEOUT_ROUTE = 'kazoo_timeout_'
#: The route t_continue runs for a resume: ``Handler`` resolves ``kazoo_resume_<method>``
#: to ``method`` run with the transaction's timers and failure route reset (see
#: ``Kazoo.resumed``).
_RESUME_ROUTE = 'kazoo_resume_'
#: The resume queue's consumer tag (and as basic.deliver carries it: its length first).
_ASYNC_TAG = 'kg-async'
_ASYNC_TAG_WIRE = bytes((len(_ASYNC_TAG),)) + _ASYNC_TAG.encode()
# How long a resumed Msg-ID is remembered, to drop a second copy of its reply.
_DONE_TTL = 60.0
_NO_LAG = float('inf')
#: Unacked replies a consumer process holds: more go to the others.
ASYNC_PREFETCH = 32
#: Resumed replies are acked together (one basic.ack ``multiple``), when this many are
#: done or ACK_DELAY seconds after the first of them (``_acks.AckWindow``): an ack's
#: loopback TCP write costs about what a resume's ``t_reply`` does (py-spy of a resuming
#: process), so the fewer the better, within the prefetch (ASYNC_PREFETCH).
ACK_BATCH = 16
ACK_DELAY = 0.03
#: The counters an async query sent on the lane changes.
_SENT = ('queries', 'published')
#: ... and a sync query whose lane read its reply and nothing else.
_ASKED = ('queries', 'published', 'queries_ok')
#: Default ``Kazoo(shed_lag=)``: a standing lag of a quarter second sheds new async queries.
SHED_LAG = 0.25


def _ksr():
    """Kamailio's ``KSR`` module (ImportError outside Kamailio, or without a test's
    fake): found in ``sys.modules`` once imported, cheaper than an import statement on
    every call (a resume makes three)."""
    ksr = sys.modules.get('KSR')
    if ksr is None:
        import KSR as ksr  # only importable inside Kamailio (or a test's fake)
    return ksr


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
    """What ``reply()``/``reply_error()`` give: per greenlet (a consumer process
    resumes on several worker greenlets at once)."""
    reply = None
    error = None


class _LoopResume(object):
    """The same in a ``kazoo_resumer`` process, where only the loop's greenlet
    resumes (one at a time): a plain object, no greenlet-local lookups."""
    __slots__ = ('reply', 'error')

    def __init__(self):
        self.reply = self.error = None


def _counted(method, narrow=None):
    """``method`` of runtime.Kazoo, then this process's statistics stored (Kamailio).
    ``narrow``: the counters the call changed when it leaves ``Stats.clean_ask`` set (a
    sync query whose lane read its reply and nothing else): only those are stored."""
    @functools.wraps(method)
    def counted(self, *args, **kwargs):
        stats = self.kamailio_stats
        if not stats._checked:
            stats.check()
        try:
            return method(self, *args, **kwargs)
        finally:
            offsets = stats.offsets_of(narrow) if narrow and self._stats.clean_ask else None
            if offsets is not None:
                stats.write_counts(offsets)
            else:
                stats.write()
    return counted


class Kazoo(runtime.Kazoo):
    """A runtime with Kamailio's async query (suspend/resume) on top."""

    def __init__(self, brokers=None, shed_lag=SHED_LAG, resume_in_consumer=True, **kwargs):
        """As ``kazoo_green.Kazoo``, plus ``shed_lag``: seconds of lag (reply resumed
        minus request sent) that, when even the quickest reply of an interval takes
        longer, make SIP workers refuse a growing share of new async queries with
        ``Overloaded`` (see ``kazoo_green._admission``); None: never refuse.
        ``resume_in_consumer=False``: the ``kazoo_consumer`` process runs event routes
        only and leaves every async resume to the ``kazoo_resumer`` processes (at least
        one must be configured then: without one, every async query ends at its
        timeout), which resume without gevent's hub in the way (``_resumeloop``)."""
        kwargs.setdefault('app_name', 'kamailio')
        # Before the fork (mod_init): the mapping is shared by every process.
        self._admission = Admission(shed_lag) if shed_lag is not None else None
        # SIP workers wait for replies in poll(2): nothing else runs there anyway.
        kwargs.setdefault('blocking', True)
        super(Kazoo, self).__init__(brokers, **kwargs)
        self.async_queue = '%s-resume' % self.node
        self._resume = _Resume()
        self._async_done = set()   # Msg-IDs resumed in the last _DONE_TTL seconds
        self._async_done_order = deque()  # (time, Msg-ID), oldest first
        self._consuming_async = False
        self.resume_in_consumer = resume_in_consumer
        #: The ResumeLoop driving this process (a ``kazoo_resumer``), else None.
        self._loop = None
        self._ack_windows = {}   # consuming link -> the AckWindow of its resume queue
        self._resume_lanes = {}  # consuming link -> its lane in a resumer (ResumeLoop)
        self._lags = []          # a resumer's (exchange, seconds) since its last books
        self._lag_min = _NO_LAG  # ... and the shortest lag of a reply since then
        #: This process's share of Kamailio's ``kazoo_green`` statistics.
        self.kamailio_stats = KamailioStats(self)
        self._pub_link.add_up_hook(self._declare_async_queue)
        # Every consuming link of the primary zone (one per broker of a standalone zone:
        # a reply may come through any of them).
        for feed in self.zones[self.zone].feeds:
            feed.link.add_up_hook(self._async_consumer(feed.link, feed.subscriber.sweep))

    # -- both sides -----------------------------------------------------
    def _declare_async_queue(self, conn, channel=None):
        """Declare and bind the instance's resume queue: on ``channel`` and waiting for
        the broker (consumer side), or else (SIP workers, where it is only there so the
        first replies find it) on a channel of its own, waiting at most
        REPLY_QUEUE_WAIT: a cluster with a frozen node stalls declarations, and sync
        queries on this connection must not wait for that."""
        wait = channel is not None or not self._pub_link.supports_amqp
        channel = channel or (conn.channel() if not wait else self._publisher.channel)
        # One queue for every consumer process of the instance (the broker spreads the
        # replies over them): any of them can resume any transaction.
        channel.queue_declare(queue=self.async_queue, durable=False, exclusive=False,
                              auto_delete=False, nowait=not wait)
        channel.queue_bind(queue=self.async_queue, exchange=self._replies.targeted_exchange,
                           routing_key=self.async_queue, nowait=not wait)
        if not wait and not done_within(channel, D.REPLY_QUEUE_WAIT):
            self._stats.reply_queue_late += 1
            log.warning('async queue %s not confirmed by the broker within %.1fs (a '
                        'stalled cluster node?)', self.async_queue, D.REPLY_QUEUE_WAIT)

    # -- SIP worker side ------------------------------------------------
    query = _counted(runtime.Kazoo.query, _ASKED)
    publish = _counted(runtime.Kazoo.publish)

    def async_query(self, exchange, routing_key, payload, on_reply, on_timeout,
                    timeout=None, headers=None):
        """Suspend the current transaction and query; resume into a method of the handler.

        ``on_reply`` runs (in a consumer process) when the reply arrives: read it with
        ``reply()``. ``on_timeout`` runs when none came within ``timeout`` seconds (tm's
        timer: in Kamailio's timer process, as a failure route), or at once (in this
        process) if the request could not be sent; ``reply_error()`` says why. The
        transaction's failure route is taken for this (``t_on_failure``). Returns the
        request's Msg-ID. Raises KazooError if the transaction cannot be suspended
        (nothing was sent then).
        """
        if not _valid_methods(on_reply, on_timeout):
            raise ValueError('on_reply/on_timeout must be method names, not %r/%r'
                             % (on_reply, on_timeout))
        stats = self.kamailio_stats
        if not stats._checked:
            stats.check()
        admission = self._admission
        if admission is not None and not admission.admit():
            self._stats.async_shed += 1
            stats.write()
            raise Overloaded('async query refused: replies are resumed late '
                             '(%.0f%% of new async queries shed)' % (admission.share * 100))
        timeout = self._timeout(timeout, self.query_timeout)
        message = self._message(payload, '')   # its Msg-ID is set below
        KSR = _ksr()
        tm = KSR.tm
        # The deadline is tm's: t_suspend adds a branch whose final-response timer is
        # this one; when it fires, tm runs the failure route (Handler: on_timeout). Both
        # set before the transaction exists are given to it when t_suspend makes it (as
        # t_on_failure before t_relay), so no t_newtran of its own.
        ms = max(1, int(timeout * 1000))
        if tm.t_set_fr(ms, ms) < 0 or tm.t_on_failure(_TIMEOUT_ROUTE + on_timeout) < 0:
            raise KazooError('cannot set the timeout of the async query\'s transaction')
        if KSR.tmx.t_suspend() < 0:
            raise KazooError('cannot create or suspend the transaction for an async query')
        pv = KSR.pv
        index = int(pv.get('$T(id_index)'))
        label = int(pv.get('$T(id_label)'))
        now = monotonic()
        msg_id = '%s:%d:%d:%s:%s:%d:%d:%s:%s' % (
            _ASYNC_PREFIX, index, label, on_reply, on_timeout, int((now + timeout) * 1000),
            int(now * 1000000), new_token(), exchange)
        message['Msg-ID'] = msg_id
        message['Server-ID'] = self.async_queue
        self._stats.queries += 1   # as query(): every one asked, sent or not
        link = self._pub_link
        publisher = self._publisher
        try:
            fast = link.lane()
            if fast is not None and exchange in publisher.verified:
                # The lane (as a sync query's): connected in this process, nothing
                # unread, no lock held; the frames written at once, nothing else done.
                gen = link.generation
                data = encode_request(publisher.channel.channel_id, exchange, routing_key,
                                      dumps(message), msg_id, self.async_queue, headers,
                                      False, fast.frame_max)
                try:
                    fast.send(data)
                except link.errors as exc:
                    link.lost(exc, gen)
                    raise ConnectionLost('%s link: %s' % (link.name, exc)) from exc
                self._stats.published += 1
                offsets = stats.offsets_of(_SENT)
                if offsets is not None:
                    stats.write_counts(offsets)   # only these two changed
                return msg_id
            link.ensure(now + timeout)
            publisher.verify(exchange)
            publisher._send(exchange, routing_key, dumps(message), headers,
                            {'correlation_id': msg_id, 'reply_to': self.async_queue}, False)
        except KazooError as exc:
            self._stats.queries_failed += 1
            log.warning('async query to %r/%r not sent: %s', exchange, routing_key, exc)
            self._continue(index, label, on_timeout, None, 'not sent: %s' % exc)
        stats.write()
        return msg_id

    def reply(self):
        """In an ``on_reply`` method: the reply payload (a dict); None elsewhere."""
        return self._resume.reply

    def reply_error(self):
        """In an ``on_timeout`` method: why there is no reply (text); None elsewhere."""
        return self._resume.error

    def _continue(self, index, label, method, reply, error, expected=True):
        """t_continue into ``method``; returns whether the transaction was resumed.

        ``expected=False``: tm may have answered the transaction at its deadline
        already, so a refusal is normal there.
        """
        resume = self._resume
        resume.reply, resume.error = reply, error
        try:
            if _ksr().tmx.t_continue(index, label, _RESUME_ROUTE + method) < 0:
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

    def connect_now(self):
        """Connect the publishing link now (``child_init`` of a SIP worker), waiting at
        most the connect timeout; a broker that cannot be reached is only logged (the
        first call tries again). Never raises."""
        try:
            self._pub_link.ensure(monotonic() + self._pub_link.connect_timeout)
        except KazooError as exc:
            log.warning('no broker at start (pid %d): %s; the first call connects',
                        os.getpid(), exc)
        except Exception:
            log.exception('connecting at start failed')

    @staticmethod
    def _untimed():
        """Undo what async_query set on the transaction: its failure route and tm's
        timers (the query's timeout) back to the defaults, so a request relayed from
        ``on_reply``/``on_timeout`` gets the usual timers and its negative replies do not
        run ``on_timeout``."""
        tm = _ksr().tm
        tm.t_on_failure('')
        tm.t_reset_fr()

    def resumed(self, method, msg):
        """The route t_continue runs (see ``Handler``): ``method(msg)``, the transaction
        reset first (``_untimed``)."""
        self._untimed()
        return method(msg)

    def timed_out(self, method, msg):
        """tm's failure route at an async query's deadline (see ``Handler``): ``method``
        of ``handler`` with ``reply_error()`` 'timeout'."""
        stats = self.kamailio_stats
        if not stats._checked:
            stats.check()
        self._stats.queries_timeout += 1
        resume = self._resume
        resume.error = 'timeout'
        try:
            self._untimed()
            return method(msg)
        finally:
            resume.error = None
            stats.write()

    # -- consumer process side -----------------------------------------
    def _async_consumer(self, link, sweep):
        def swept(conn):
            # A cluster's clean-up deleted the queue (see _sweep): a new one, consumed
            # on a new channel; what this process resumed from the old one is acked.
            old = self._ack_windows.get(link)
            consume_async_queue(conn)
            if old is not None:
                old.flush()

        def consume_async_queue(conn):
            if not self._consuming_async:
                return
            sweep.watch(_ASYNC_TAG, self.async_queue, swept)
            channel = conn.channel()
            self._declare_async_queue(conn, channel)
            channel.basic_qos(0, ASYNC_PREFETCH, False)
            acks = AckWindow(link, channel, ACK_BATCH, ACK_DELAY, self._ack_failed,
                             timer=self._loop is None)
            self._ack_windows[link] = acks

            def on_message(raw):
                self._on_async_message(raw, acks)
            link.consume(channel, self.async_queue, _ASYNC_TAG, on_message, False)
            if self._loop is not None:   # its whole messages straight to _on_async_reply
                self._resume_lanes[link] = (channel.channel_id, _ASYNC_TAG_WIRE,
                                            functools.partial(self._on_async_reply, acks))
        return consume_async_queue

    def _on_async_message(self, message, acks=None):
        """A delivery of the resume queue (``Delivered``, or kombu's message). Never
        raises."""
        props = getattr(message, 'properties', None) or {}
        self._on_async_reply(acks, getattr(message, 'delivery_tag', None),
                             props.get('correlation_id'), message.body,
                             getattr(message, 'bad', None))

    def _on_async_reply(self, acks, tag, correlation_id, body, bad):
        """One delivery of the resume queue, in the process reading it: its transaction
        resumed here (a ``kazoo_resumer``'s loop) or by a worker greenlet. Never
        raises."""
        try:
            if bad:
                raise BadMessage(bad)
            payload = loads_payload(body)
        except BadMessage as exc:
            # Which transaction it was for is unknown (or untrusted): tm resumes it into
            # on_timeout at its deadline.
            self._stats.bad_input += 1
            _logs.bad_input.warning('bad message on %s (%d bytes): %s', self.async_queue,
                                    len(body or b''), exc)
            self._ack(acks, tag)
            return
        stamp_received(payload, self.zone)   # as consumed messages and sync replies
        msg_id = correlation_id or payload.get('Msg-ID')
        info = _parse_async_id(msg_id)
        if info is None:
            self._stats.replies_unmatched += 1
            _logs.bad_input.warning('reply on %s without an async Msg-ID: %s',
                                    self.async_queue, _logs.short(msg_id))
            self._ack(acks, tag)
            return
        index, label, on_reply, on_timeout, deadline, sent, exchange = info
        if msg_id in self._async_done:
            self._stats.replies_unmatched += 1  # a second copy
            self._ack(acks, tag)
            return
        now = monotonic()
        lag = now - sent
        loop = self._loop
        if loop is None:
            if self._admission is not None:
                self._admission.observe(lag)
        elif lag < self._lag_min:
            self._lag_min = lag   # for the admission, with the books (_loop_books)
        if now > deadline:
            # tm answers it (answered) through on_timeout: shed, do not resume late.
            self._stats.async_late += 1
            self._ack(acks, tag)
            return
        if loop is None:
            self._mark_done(msg_id, now)
            self.dispatcher.submit(self._resume_reply, (index, label, on_reply, payload, acks,
                                                        tag, exchange, lag))
            return
        # A resuming process's loop (nothing else to run): resumed here and now, the
        # books (histogram, done-set expiry) kept once a chore (_loop_books: cold caches
        # make each function a reply touches cost microseconds, a batch pays that once).
        self._remember_done(msg_id, now)
        self._resume_reply(index, label, on_reply, payload, acks, tag, exchange, lag)

    def _loop_books(self):
        """A resuming loop's chore: what its resumes left to count (the latency
        histogram, the admission's shortest lag) counted, the done Msg-IDs expired."""
        lags, self._lags = self._lags, []
        observe = self._stats.observe
        for exchange, seconds in lags:
            observe('query_seconds', exchange, seconds)
        if self._admission is not None and self._lag_min != _NO_LAG:
            self._admission.observe(self._lag_min)
        self._lag_min = _NO_LAG
        self._expire_done(monotonic())

    def _resume_reply(self, index, label, method, payload, acks, tag, exchange, seconds):
        try:
            if self._continue(index, label, method, payload, None, expected=False):
                self._stats.queries_ok += 1
                if self._loop is not None:
                    self._lags.append((exchange, seconds))   # counted by _loop_books
                else:
                    self._stats.observe('query_seconds', exchange, seconds)
            else:
                # No longer suspended: tm answered it at its deadline meanwhile, or this
                # is a copy redelivered after another process resumed it (and lost its
                # connection before the ack).
                self._stats.replies_unmatched += 1
        finally:
            self._ack(acks, tag)

    @staticmethod
    def _ack(acks, tag):
        """One delivery of the resume queue is done with (after its resume): acked with
        the others of its window. Never raises."""
        if acks is not None and tag is not None:
            acks.done(tag)

    def _ack_failed(self, exc):
        self._stats.ack_failed += 1
        log.warning('cannot ack replies on %s: %s', self.async_queue, exc)

    def _mark_done(self, msg_id, now):
        self._expire_done(now)
        self._remember_done(msg_id, now)

    def _remember_done(self, msg_id, now):
        """``msg_id`` was resumed (a second copy of its reply is dropped until expired:
        ``_expire_done``, here or in a resuming loop's books)."""
        self._async_done.add(msg_id)
        self._async_done_order.append((now, msg_id))

    def _expire_done(self, now):
        done, order = self._async_done, self._async_done_order
        while order and now - order[0][0] > _DONE_TTL:  # oldest first: O(1) each
            done.discard(order.popleft()[1])

    def after_fork(self):
        """In ``child_init``: nothing inherited from the parent is used (no I/O here)."""
        self._async_done = set()
        self._async_done_order = deque()
        self.kamailio_stats.forked()

    def stop(self, timeout=None):
        if self._loop is not None:
            self._loop.stop()
        self.kamailio_stats.stop()
        if timeout is None:
            super(Kazoo, self).stop()
        else:
            super(Kazoo, self).stop(timeout)

    def run_consumer(self, subscriptions=True):
        """A consumer process's body (from rtimer): never returns. ``subscriptions=False``
        (``kazoo_resumer``): only async resumes, the subscriptions are left to the
        ``kazoo_consumer`` process."""
        self._consuming_async = not subscriptions or self.resume_in_consumer
        if not subscriptions:
            for z in self.zones.values():
                for feed in z.feeds:
                    feed.subscriber.subscriptions = []
        self.kamailio_stats.check()
        feeds = self.zones[self.zone].feeds
        if not subscriptions and all(f.publisher is None and f.link.use_fast
                                     and not f.link.memory for f in feeds):
            return self._run_resume_loop([f.link for f in feeds])
        if self._admission is not None and self._consuming_async:
            # Only where replies are resumed (their lags observed): elsewhere an update
            # sees none and lowers the share the resuming processes raise.
            gevent.spawn(self._admission_loop)
        self.start()
        if self._consuming_async:
            for feed in feeds:
                feed.link.start()  # the resume queue needs them even without subscriptions
        while True:
            gevent.sleep(PUSH_INTERVAL)
            self.kamailio_stats.tick()


    def _run_resume_loop(self, links):
        """A resuming process without the hub in the way (``_resumeloop``), until
        ``stop()``."""
        periodic = [(POLL_CAP, self._loop_books), (PUSH_INTERVAL, self.kamailio_stats.tick)]
        # Their fixed-name queue's checks after a connect (see _sweep): no reader here.
        periodic.extend((POLL_CAP, f.subscriber.sweep.tick) for f in self.zones[self.zone].feeds
                        if f.subscriber.sweep.enabled)
        if self._admission is not None:
            periodic.append((ADMISSION_INTERVAL, self._admission.update))
        self._loop = ResumeLoop(links, self._ack_windows, periodic, self._resume_lanes)
        self._resume = _LoopResume()
        self.start()   # the publishing link's reader; these links are the loop's
        self._loop.run()

    def _admission_loop(self):
        admission = self._admission
        while True:
            gevent.sleep(ADMISSION_INTERVAL)
            try:
                admission.update()
            except Exception:   # never: but the loop must not die of it
                log.exception('async admission update failed')


def _valid_methods(on_reply, on_timeout):
    """Whether both are method names async_query allows (a pair found so is
    remembered in ``_VALID_PAIRS``)."""
    if not (isinstance(on_reply, str) and isinstance(on_timeout, str)):
        return False
    pair = (on_reply, on_timeout)
    if pair in _VALID_PAIRS:
        return True
    if not (_METHOD.fullmatch(on_reply) and _METHOD.fullmatch(on_timeout)):
        return False
    if len(_VALID_PAIRS) >= _VALID_PAIRS_MAX:
        _VALID_PAIRS.clear()
    _VALID_PAIRS.add(pair)
    return True


def _parse_async_id(msg_id):
    """(index, label, on_reply, on_timeout, deadline, sent, exchange) from an async Msg-ID
    (times: monotonic seconds), or None."""
    if not isinstance(msg_id, str) or not msg_id.startswith(_ASYNC_PREFIX + ':'):
        return None
    parts = msg_id.split(':', 8)
    if len(parts) != 9:
        return None
    if not _valid_methods(parts[3], parts[4]):
        return None   # only handler methods named as async_query allows are resumed into
    try:
        return (int(parts[1]), int(parts[2]), parts[3], parts[4], int(parts[5]) / 1000.0,
                int(parts[6]) / 1000000.0, parts[8])
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
        if rank > 0:   # a SIP worker: its first calls must not pay for the connection
            self.kz.connect_now()
        return 0

    def kazoo_consumer(self, msg, evname=None):
        """Name this in rtimer (``route=kazoo_consumer``): runs the consumer forever
        (subscriptions and async resumes)."""
        log.info('consumer process %d started', os.getpid())
        self.kz.run_consumer()
        return 1

    def kazoo_resumer(self, msg, evname=None):
        """Name this in rtimer (``route=kazoo_resumer``, ``mode=N``): N more processes
        that resume async queries (no subscriptions), forever."""
        log.info('resumer process %d started', os.getpid())
        self.kz.run_consumer(subscriptions=False)
        return 1

    def __getattr__(self, name):
        # Kamailio looks the route up by name at every call: each is made once, then
        # found in the instance's own dict.
        # tm's failure route at an async query's deadline: kazoo_timeout_<on_timeout>.
        if name.startswith(_TIMEOUT_ROUTE):
            method = getattr(self, name[len(_TIMEOUT_ROUTE):])
            fn = functools.partial(self.kz.timed_out, method)
        # t_continue's route for a resume: kazoo_resume_<on_reply or on_timeout>.
        elif name.startswith(_RESUME_ROUTE):
            method = getattr(self, name[len(_RESUME_ROUTE):])
            fn = functools.partial(self.kz.resumed, method)
        else:
            raise AttributeError(name)
        self.__dict__[name] = fn
        return fn
