"""Queries: one reply queue per process, both reply styles, correlation by Msg-ID."""

import itertools
import logging
import socket
from collections import deque
from time import monotonic

from amqp import spec

import gevent
from gevent.event import AsyncResult

from . import _defaults as D, _logs
from ._amqpfast import encode_request
from ._deliver import Delivered, decode_properties
from .errors import (
    BadMessage, ConnectionLost, KazooError, NotConnected, QueryFailed, QueryTimeout, Unroutable,
)
from .wire import current_pid, dumps, loads_payload, stamp_received

__all__ = ['ReplyWaiter', 'done_within']

log = logging.getLogger('kazoo_green')


#: The consumer tags of the reply queues (basic.consume on direct reply-to, and on
#: the Kazoo-style queue) as AMQP short strings; FastPath.ask returns their messages
#: undispatched.
_REPLY_TAGS = (b'\x0bkg-reply-to', b'\x0bkg-targeted')
# Each ReplyWaiter's number in its process: part of its reply queue's name, so two of one
# node in one process (two runtimes, or two zones on one broker) never share a queue.
_SERIAL = itertools.count(1)


class _Waiting(object):
    """A blocking query's outcome, set by the reply, a return or a lost connection:
    the part of AsyncResult's API that code filling results uses, without gevent
    (its cold code costs a SIP worker more than this)."""

    value = error = None   # class defaults: made without calling an __init__

    def ready(self):
        return self.value is not None or self.error is not None

    def set(self, value):
        self.value = value

    def set_exception(self, error):
        self.error = error

    def get(self, block=False):
        if self.error is not None:
            raise self.error
        return self.value


class ReplyWaiter(object):
    """Correlates replies with waiting queries.

    Every request carries both reply styles of KAZOO-WIRE.md:

    * ``Server-ID``: the routing key of this process's reply queue on the
      direct exchange ``targeted``, for Kazoo-style responders that copy
      ``Msg-ID`` into the reply;
    * ``reply_to`` = RabbitMQ direct reply-to and ``correlation_id`` =
      ``Msg-ID``, for generic AMQP responders (RabbitMQ only).

    The reply queue is declared and consumed during connect, before any
    request can go out, so no reply finds it missing.
    """

    def __init__(self, link, publisher, stats, node, direct_reply_to=True,
                 targeted_exchange=D.TARGETED_EXCHANGE, shared_key=False):
        self.link = link
        self._serial = next(_SERIAL)
        #: Standalone brokers: the Server-ID is one routing key for the process, bound on
        #: every broker of the zone (see ``listen``), so a reply published on any of them
        #: comes back; else it names this connection's reply queue.
        self.shared_key = shared_key
        #: ``fn(payload, message, link)`` for a good message on a reply queue that answers no
        #: query (the C module runs such messages as events); None: counted and dropped.
        self.on_unsolicited = None
        #: Standalone brokers, caller-driven: one reply-only link per broker of the zone
        #: (see ``_watch``), read while a query waits. Started runtimes have the zone's
        #: consuming links for that (``listener``).
        self.via_links = []
        self._via_retry = {}   # via link -> (monotonic time of the next try, delay)
        self._answered = set()      # Msg-IDs answered or timed out lately ...
        self._answered_order = deque()   # ... oldest first, at most ANSWERED_MEMORY
        self.publisher = publisher
        self.stats = stats
        self.node = node
        self.direct_reply_to = direct_reply_to
        self.targeted_exchange = targeted_exchange
        self.use_reply_to = False
        self._pending = {}
        self._server_id = None
        self._server_pid = None
        self._connections = 0
        link.add_up_hook(self._setup)
        link.on_down(self._down)
        publisher.on_return = self._returned

    @property
    def server_id(self):
        """Routing key (and queue name) of this process's reply queue.

        Named anew for each connection: after leaving a broker that froze, the old
        connection (and the exclusive queue it owns) can live on for a while.
        """
        pid = current_pid()
        if self._server_pid != pid:
            self._server_id = self._name(pid, 0)
            self._server_pid = pid
        if self.shared_key:
            return self._name(pid, 0)
        return self._server_id

    def _name(self, pid, count):
        return '%s-<%d>-targeted-%x%s' % (self.node, pid, self._serial,
                                          '-%d' % count if count else '')

    @property
    def pending(self):
        return len(self._pending)

    def _setup(self, conn):
        channel = self.publisher.channel
        probe = conn.channel()
        try:
            probe.exchange_declare(exchange=self.targeted_exchange, type='direct', passive=True)
        except self.link.channel_errors:
            # Not there yet: declare it as Kazoo and the C module do (direct, neither
            # durable nor auto-delete: any other flags make their declarations fail).
            # py-amqp has re-opened the channel the broker closed.
            probe.exchange_declare(exchange=self.targeted_exchange, type='direct',
                                   durable=False, auto_delete=False)
        probe.close()
        self._server_id = self._name(current_pid(), self._connections)
        self._server_pid = current_pid()
        self._connections += 1
        queue = self._server_id
        key = self.server_id
        self.use_reply_to = self.direct_reply_to and self.link.supports_amqp
        if not self.use_reply_to:
            channel.queue_declare(queue=queue, exclusive=True, auto_delete=True)
            channel.queue_bind(queue=queue, exchange=self.targeted_exchange,
                               routing_key=key)
            self.link.consume(channel, queue, 'kg-targeted', self._on_reply, True)
            return
        # Direct reply-to needs nothing declared: it works at once on any node.
        self.link.consume(channel, D.DIRECT_REPLY_TO, 'kg-reply-to', self._on_reply, True)
        self._declare_reply_queue(conn.channel(), queue, key)

    def listener(self, link):
        """An up-hook for ``link``, a consuming connection to another broker of this
        (standalone) zone: a reply queue there, bound to ``targeted`` with this process's
        Server-ID, whose messages go where the publishing connection's go."""
        count = [0]

        def listen(conn):
            count[0] += 1
            queue = '%s-%s-%d' % (self._name(current_pid(), 0), link.name, count[0])
            channel = conn.channel()
            channel.exchange_declare(exchange=self.targeted_exchange, type='direct',
                                     durable=False, auto_delete=False)
            channel.queue_declare(queue=queue, exclusive=True, auto_delete=True)
            channel.queue_bind(queue=queue, exchange=self.targeted_exchange,
                               routing_key=self.server_id)
            link.consume(channel, queue, 'kg-targeted', self._on_reply, True)
        return listen

    def _declare_reply_queue(self, channel, queue, key):
        """Declare, bind and consume the Kazoo-style reply queue on a channel of its own,
        and wait (at most REPLY_QUEUE_WAIT) until the broker has done it.

        Normally that takes a millisecond. While a cluster node is frozen, RabbitMQ
        stalls queue declarations cluster-wide until net_ticktime declares the node
        down; queries then go out with direct reply-to only (Kazoo-style replies find
        the queue once the broker is done) instead of not at all.
        """
        channel.queue_declare(queue=queue, exclusive=True, auto_delete=True, nowait=True)
        channel.queue_bind(queue=queue, exchange=self.targeted_exchange, routing_key=key,
                           nowait=True)
        self.link.consume(channel, queue, 'kg-targeted', self._on_reply, True, nowait=True)
        if not done_within(channel, D.REPLY_QUEUE_WAIT):
            self.stats.reply_queue_late += 1
            log.warning('reply queue %s not confirmed by the broker within %.1fs (a stalled '
                        'cluster node?); direct reply-to carries replies meanwhile',
                        queue, D.REPLY_QUEUE_WAIT)

    def _down(self, link, exc):
        pending, self._pending = self._pending, {}
        error = ConnectionLost('connection to the broker lost while waiting for the reply: %s'
                               % (exc,))
        for result in pending.values():
            if not result.ready():
                result.set_exception(error)

    def _returned(self, correlation_id, exchange, routing_key, reply_text):
        """Fail the query a returned request belongs to; True if there was one."""
        result = self._pending.get(correlation_id)
        if result is None:
            return False
        if not result.ready():
            result.set_exception(Unroutable('query to %r/%r was returned by the broker: %s'
                                            % (exchange, routing_key, reply_text)))
        return True

    def _on_reply(self, message):
        """Runs in the greenlet that reads the socket: no blocking here, and never raises:
        a reply that cannot be used fails the query it names, if any, and is counted."""
        correlation_id = message.properties.get('correlation_id')
        result = self._pending.get(correlation_id) if correlation_id else None
        bad = getattr(message, 'bad', None)
        try:
            payload = loads_payload(message.body)
        except BadMessage as exc:
            payload, bad = None, bad or str(exc)
        if bad:
            if result is None and payload is not None:   # bad properties, good body
                result = self._pending.get(_msg_id(payload))
            self.stats.bad_input += 1
            _logs.bad_input.warning('bad reply (correlation_id %s, %d bytes): %s%s',
                                    _logs.short(correlation_id), len(message.body or b''),
                                    bad, '' if result is not None else
                                    ' (no waiting query found for it)')
            if result is not None and not result.ready():
                result.set_exception(QueryFailed('bad reply: %s' % bad))
            return
        msg_id = _msg_id(payload)
        if result is None:
            result = self._pending.get(msg_id)
        if result is None or result.ready():
            if (result is None and msg_id not in self._answered
                    and correlation_id not in self._answered
                    and self.on_unsolicited is not None
                    and self.on_unsolicited(payload, message, self.link)):
                return
            self.stats.replies_unmatched += 1
            log.debug('reply matches no waiting query (Msg-ID=%s)', _logs.short(msg_id))
            return
        result.set(stamp_received(payload, self.link.zone))   # as consumed messages are

    def answered(self, msg_id):
        """Remember ``msg_id`` (answered or timed out): a copy or a late reply of it is
        not an unsolicited message."""
        done, order = self._answered, self._answered_order
        done.add(msg_id)
        order.append(msg_id)
        if len(order) > D.ANSWERED_MEMORY:
            done.discard(order.popleft())

    def query(self, exchange, routing_key, payload, timeout, headers=None, mandatory=True):
        """Send ``payload`` (a stamped dict) and return the reply dict."""
        started = monotonic()
        deadline = started + timeout
        msg_id = payload['Msg-ID']
        if msg_id in self._pending:
            raise KazooError('a query with Msg-ID %r is already waiting' % (msg_id,))
        link = self.link
        stats = self.stats
        stats.queries += 1
        stats.clean_ask = False
        try:
            fast = link.lane() if link.blocking else None
            if fast is not None:
                reply = self._ask(fast, exchange, routing_key, payload, timeout, headers,
                                  mandatory, deadline, msg_id)
            else:
                reply = self._publish_and_wait(exchange, routing_key, payload, timeout,
                                               headers, mandatory, deadline, msg_id)
            stats.observe('query_seconds', exchange, monotonic() - started)
            return reply
        except QueryTimeout:
            raise
        except KazooError:
            self.stats.queries_failed += 1
            raise

    def _publish_and_wait(self, exchange, routing_key, payload, timeout, headers, mandatory,
                          deadline, msg_id):
        """``query`` the general way: publish, then wait (reading, unless a background
        reader does)."""
        link = self.link
        # Connected before this query waits: a reconnect fails waiting queries, and
        # the reply queue's name and use_reply_to are known then.
        link.ensure(deadline)
        payload['Server-ID'] = self.server_id
        result = AsyncResult()
        self._pending[msg_id] = result
        try:
            props = {'correlation_id': msg_id}
            if self.use_reply_to:
                props['reply_to'] = D.DIRECT_REPLY_TO
            watchers = self._watch(result, deadline) if self.via_links else []
            self.publisher.publish(exchange, routing_key, dumps(payload), headers, props,
                                   mandatory=mandatory and link.supports_amqp,
                                   deadline=deadline, buffer=False, ensured=True)
            if watchers:
                # Every link read in a greenlet of its own: a reply through any of them
                # ends the wait at once (the killall below stops the others' reads).
                watchers.append(gevent.spawn(link.wait, result, deadline))
                result.wait(max(0.0, deadline - monotonic()))
            else:
                link.wait(result, deadline)
            return self._outcome(result, exchange, routing_key, timeout, msg_id)
        finally:
            self._pending.pop(msg_id, None)
            self.answered(msg_id)
            if self.via_links:
                gevent.killall(watchers, block=False)

    def _watch(self, result, deadline):
        """Caller-driven, standalone brokers: read every broker's reply-only link until
        ``result`` is ready (a reply published on any broker of the zone comes back). A link
        not connected yet connects in the background: a broker that is down costs the
        query nothing, and the first query may miss a reply sent through a broker whose
        reply queue was not bound yet."""
        if self.link._reader is not None:
            return []   # started: the zone's consuming links listen on every broker
        now = monotonic()
        retry = self._via_retry
        return [gevent.spawn(self._watch_link, via, result, deadline)
                for via in self.via_links if via.connected or retry.get(via, (0, 0))[0] <= now]

    def _watch_link(self, link, result, deadline):
        if not link.connected:
            try:
                link.ensure(deadline)
            except NotConnected:
                # Down: not tried again (nor logged) by every query; back off, up to 5 s.
                delay = min(max(self._via_retry.get(link, (0, 0))[1] * 2, D.RECONNECT_DELAY),
                            D.VIA_RETRY_MAX)
                self._via_retry[link] = (monotonic() + delay, delay)
                return
            self._via_retry.pop(link, None)
        link.wait(result, deadline)

    def _ask(self, fast, exchange, routing_key, payload, timeout, headers, mandatory,
             deadline, msg_id):
        """``query`` on a blocking link's lane (Kamailio's SIP workers): the request is
        written and its reply read in one flat pass (see ``FastPath.ask``); a reply whose
        body carries this query's Msg-ID is taken without decoding its properties."""
        publisher = self.publisher
        if exchange not in publisher.verified:
            publisher.verify(exchange)
        # Connected in this process (Link.lane), so _setup named the reply queue here.
        payload['Server-ID'] = self.server_id if self.shared_key else self._server_id
        data = encode_request(publisher.channel.channel_id, exchange, routing_key,
                              dumps(payload), msg_id,
                              D.DIRECT_REPLY_TO if self.use_reply_to else None, headers,
                              mandatory, fast.frame_max)
        waiting = _Waiting()
        self._pending[msg_id] = waiting
        link = self.link
        gen = link.generation
        raw = fast.connection
        mark = raw.bytes_recv
        try:
            try:
                got = fast.ask(data, deadline, waiting.ready, _REPLY_TAGS)
            except socket.timeout:
                self.stats.published += 1   # written: only reads time out
                raise
            self.stats.published += 1
            while got is not None:
                method, header, body = got
                try:
                    reply = loads_payload(body)
                except BadMessage:
                    reply = None
                if reply is not None and reply.get('Msg-ID') == msg_id:
                    stats = self.stats
                    stats.queries_ok += 1
                    # Only this reply read: no other frame handled, no other counter.
                    stats.clean_ask = raw.bytes_recv == mark + 1
                    return stamp_received(reply, link.zone)
                # Not this query's, or not JSON: as the consumer callback would.
                properties, bad = decode_properties(header, 12, len(header))
                self._on_reply(Delivered(body, properties, None, method, bad))
                if waiting.ready():
                    break
                got = fast.ask(None, deadline, waiting.ready, _REPLY_TAGS)
        except socket.timeout:
            pass
        except link.errors as exc:
            link.lost(exc, gen)   # fails ``waiting`` (_down)
        except Exception as exc:  # a bug must not leave the stream half-read
            log.exception('query to %r/%r: unexpected error while reading', exchange,
                          routing_key)
            link.lost(exc, gen)
        finally:
            self._pending.pop(msg_id, None)
            # Not remembered (``answered``): the lane is only taken without a background
            # reader, where nothing runs unsolicited messages as events anyway.
        return self._outcome(waiting, exchange, routing_key, timeout, msg_id)

    def _outcome(self, result, exchange, routing_key, timeout, msg_id):
        """The reply in ``result``, or the query's error (a timeout counted here, other
        errors by ``query``)."""
        if not result.ready():
            self.stats.queries_timeout += 1
            # Caller-driven: a silent timeout may be a frozen broker; check it.
            self.link.send_probe(self.publisher.send_probe)
            raise QueryTimeout('no reply from %r/%r within %.3fs (Msg-ID %s)'
                               % (exchange, routing_key, timeout, msg_id))
        reply = result.get(block=False)
        self.stats.queries_ok += 1
        return reply


def _msg_id(payload):
    """The payload's Msg-ID if it is text (anything else matches no query)."""
    msg_id = payload.get('Msg-ID')
    return msg_id if isinstance(msg_id, str) else None


def done_within(channel, timeout):
    """Whether the broker has carried out the nowait methods sent on ``channel`` so far,
    waiting at most ``timeout`` seconds: the channel answers a basic.qos only after them
    (an answer that comes later is ignored)."""
    channel.send_method(spec.Basic.Qos, 'lBb', (0, 0, False))
    try:
        channel.wait(spec.Basic.QosOk, timeout=timeout)
    except socket.timeout:
        return False
    return True
