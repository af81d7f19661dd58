"""Subscriptions: topology, consuming, decoding, and acks in either mode."""

import copy
import logging
import os
from time import monotonic

import gevent
from amqp import spec

from . import _defaults as D, _logs
from ._dispatch import Delivery
from ._sweep import SweepGuard
from .errors import BadMessage, InvalidPayload, KazooError, NotConnected
from .wire import loads_payload, route_names, stamp_received

__all__ = ['Subscription', 'Subscriber', 'ACK_MODES']

log = logging.getLogger('kazoo_green')

#: Distinct route names without a route that are warned about (once each); beyond it,
#: unrouted messages are only counted (whoever can publish chooses the names).
UNROUTED_WARN_MAX = 256

#: late: ack after the handler returned, reject if it raised;
#: early: ack just before the handler runs; none: consume with no_ack.
ACK_MODES = ('late', 'early', 'none')


class Subscription(object):
    """One queue bound to one exchange with one or more routing keys."""

    def __init__(self, exchange, routing_key, queue=None, exchange_type='direct',
                 durable=False, auto_delete=None, exclusive=False, passive=False,
                 queue_arguments=None, exchange_durable=False, ack='late', prefetch=None,
                 event_key=None, event_subkey=None, worker_key=None,
                 exchange_auto_delete=False, exchange_internal=False,
                 exchange_bindings=None, federate=False):
        if ack not in ACK_MODES:
            raise ValueError('ack must be one of %s, not %r' % (', '.join(ACK_MODES), ack))
        if isinstance(routing_key, str):
            routing_key = [routing_key]
        self.exchange = exchange or ''
        self.routing_keys = list(routing_key or [''])
        self.queue = queue
        self.exchange_type = exchange_type
        self.durable = durable
        self.auto_delete = (queue is None) if auto_delete is None else auto_delete
        self.exclusive = exclusive
        self.passive = passive
        self.queue_arguments = dict(queue_arguments) if queue_arguments else None
        self.exchange_durable = exchange_durable
        self.exchange_auto_delete = exchange_auto_delete
        self.exchange_internal = exchange_internal
        self.exchange_bindings = _exchange_bindings(exchange_bindings)
        if self.exchange_bindings and not self.exchange:
            raise ValueError('exchange_bindings need an exchange to bind to')
        self.federate = federate
        self.ack = ack
        self.prefetch = prefetch
        self.event_key = event_key
        self.event_subkey = event_subkey
        self.worker_key = worker_key
        #: Its number in the runtime (names its queue and consumer tag).
        self.index = 0
        #: The copies consuming it, one per connection it is consumed on (the zone's, or
        #: every zone's with ``federate``; one per broker of a standalone zone).
        self.copies = [self]
        #: The zone of the connection this copy consumes on.
        self.zone = None
        self.tag = None
        self.channel = None  # the consuming channel of the current connection
        self.retrying = False  # a greenlet is trying to set it up again
        self.serial = 0  # bumped for each new connection and broker cancel: see queue_name
        self.queue_in_use = queue
        #: Channels consuming a copy of its queue that the broker deleted (see _sweep).
        self.orphans = []

    def copy_for(self, zone):
        """A copy with the same settings and fresh per-connection state, for ``zone``."""
        twin = copy.copy(self)
        twin.zone = zone
        twin.tag = twin.channel = None
        twin.retrying = False
        twin.serial = 0
        twin.queue_in_use = self.queue
        twin.orphans = []
        return twin

    def queue_name(self, node, index):
        """``queue``, or a name made up for this process, subscription and ``serial``.

        A made-up name is new on every connection (and after the broker cancelled the
        consumer), like the reply queue's: RabbitMQ 3.x (Mnesia) cleans up the transient
        queues of a node that died on every surviving node, each listing them, deleting
        them *by name* and then their topic bindings, in separate transactions. A queue
        declared and bound again under the old name meanwhile loses its record or its
        topic binding to that cleanup: nothing is routed to it any more while its
        consumer lives on, never cancelled (rabbitmq-server#6271, #9798). Only queues
        that go away with their consumer are renamed (``renamable``): a durable or
        lasting one under a new name would leave the old one filling up unconsumed.
        """
        if self.queue:
            return self.queue
        return '%s-%s-<%d>-%d%s' % (node, self.exchange or 'default', os.getpid(), index,
                                    '-%d' % self.serial if self.serial else '')

    @property
    def renamable(self):
        """A made-up name for a transient queue that goes away with its consumer."""
        return (self.queue is None and not self.durable
                and bool(self.auto_delete or self.exclusive))

    def __repr__(self):
        return '<Subscription %s %r -> %r ack=%s%s>' % (
            self.exchange, self.routing_keys, self.queue_in_use, self.ack,
            ' zone=%s' % self.zone if self.zone else '')


def _exchange_bindings(bindings):
    """``[(source, routing key, type, durable), ...]`` from ``exchange_bindings``: the C
    module's object ``{SOURCE: {'type': T, 'routing': KEY or [KEYS], 'durable': B}}``, or a
    list of ``{'exchange': SOURCE, 'routing_key': KEY or [KEYS], 'type': T, 'durable': B}``
    or ``(SOURCE, KEY)`` pairs. With a type the source exchange is declared too, else it
    must exist. Every entry is applied (the C module applies only the first)."""
    items = []
    if isinstance(bindings, dict):
        for source, options in bindings.items():
            options = dict(options or {})
            unknown = set(options) - {'type', 'routing', 'durable', 'passive', 'auto_delete',
                                   'internal'}
            if unknown:
                raise ValueError('exchange binding %r: unknown keys %s'
                                 % (source, ', '.join(sorted(unknown))))
            items.append({'exchange': source, 'routing_key': options.get('routing', ''),
                          'type': options.get('type'),
                          'durable': options.get('durable', False)})
    else:
        items = list(bindings or ())
    out = []
    for item in items:
        if isinstance(item, dict):
            unknown = set(item) - {'exchange', 'routing_key', 'type', 'durable'}
            if unknown or not item.get('exchange'):
                raise ValueError('exchange binding %r: needs "exchange", may have '
                                 '"routing_key", "type", "durable"' % (item,))
            keys = item.get('routing_key', '')
            keys = [keys] if isinstance(keys, str) else list(keys)
            for key in keys or ['']:
                out.append((item['exchange'], key, item.get('type'),
                            bool(item.get('durable', False))))
        else:
            source, key = item
            out.append((source, key, None, False))
    return out



class Subscriber(object):
    """Declares and consumes every subscription on one link, on each connect."""

    def __init__(self, link, dispatcher, routes, stats, node, prefetch, via=None,
                 event_keys=(D.EVENT_KEY, D.EVENT_SUBKEY)):
        self.link = link
        #: The runtime's key fields, for subscriptions that name none.
        self.event_keys = event_keys
        #: The Publisher on this very connection (standalone brokers), for replies.
        self.via = via
        self.dispatcher = dispatcher
        self.routes = routes
        self.stats = stats
        self.node = node
        self.prefetch = prefetch
        self.subscriptions = []
        self._unrouted_seen = set()
        self._connections = 0
        #: Looks again at the fixed-name queues after each connect to a cluster.
        self.sweep = SweepGuard(link)
        link.add_up_hook(self._setup_all)
        link.on_down(self._down)

    def add(self, sub):
        """Register ``sub``; set it up now when the link is up (errors raise here)."""
        sub.tag = 'kg-%d' % (sub.index + 1)
        self.subscriptions.append(sub)
        if self.link.connected:
            try:
                self.link.rpc(self._setup, sub, self.link._conn)
            except self.link.channel_errors as exc:
                self.subscriptions.remove(sub)
                raise KazooError('cannot subscribe %r: %s' % (sub, exc)) from None
        return sub

    def remove(self, sub):
        """Forget ``sub`` (its consumer cancelled when the link is up)."""
        if sub in self.subscriptions:
            self.subscriptions.remove(sub)
        self.sweep.forget(sub)
        self._cancel(sub)
        sub.channel, sub.orphans = None, []

    def _cancel(self, sub):
        """Cancel ``sub``'s consumers (its channel's and its orphans') when the link is
        up; a refusal is logged."""
        for channel in [sub.channel] + sub.orphans:
            if channel is not None and self.link.connected:
                try:
                    self.link.rpc(self.link.cancel, channel, sub.tag)
                except (KazooError,) + tuple(self.link.channel_errors) as exc:
                    log.warning('cannot cancel %r: %s', sub, exc)

    def _setup_all(self, conn):
        renew = self._connections > 0
        self._connections += 1
        for sub in self.subscriptions:
            if renew and sub.renamable:
                sub.serial += 1  # the names used before may be swept: see queue_name
            try:
                self._setup(sub, conn)
            except self.link.channel_errors as exc:
                # The broker refused this one; the others still work. It may be
                # passing (a queue whose node just died is still being cleaned up
                # cluster-wide) or not (a type or argument mismatch): retry it.
                self.stats.setup_errors += 1
                log.error('cannot set up %r: %s; retrying', sub, exc)
                self._retry_later(sub)

    def _retry_later(self, sub, delay=D.RECONNECT_DELAY):
        if not sub.retrying:
            sub.retrying = True
            gevent.spawn(self._retry, sub, delay)

    def _retry(self, sub, delay):
        """Set ``sub`` up again, backing off, until it works or a new connection does it."""
        try:
            while True:
                gevent.sleep(delay)
                link = self.link
                if sub.channel is not None or sub not in self.subscriptions:
                    return  # done meanwhile (a reconnect sets every subscription up)
                if not link.connected:
                    # Still connecting (a retry planned by _setup_all starts while the
                    # connection's later subscriptions are set up, before the link counts
                    # as up), or reconnecting: wait for it, then look again.
                    if link._reader is None:
                        return  # stopped
                    try:
                        link.ensure(monotonic() + D.SETUP_RETRY_MAX, wait=True)
                    except NotConnected:
                        pass
                    delay = 0
                    continue
                try:
                    link.rpc(self._setup, sub, link._conn)
                except link.channel_errors as exc:
                    self.stats.setup_errors += 1
                    delay = min(max(delay, D.RECONNECT_DELAY) * 2, D.SETUP_RETRY_MAX)
                    log.warning('cannot set up %r: %s; next try in %.1fs', sub, exc, delay)
                except KazooError:
                    return  # connection lost: the next connect sets it up
                else:
                    log.info('%r set up again', sub)
                    return
        finally:
            sub.retrying = False

    def _setup(self, sub, conn):
        channel = conn.channel()
        if sub.exchange:
            if sub.exchange_type and sub.exchange_internal and self.link.supports_amqp:
                # py-amqp's exchange_declare always sends internal=False; the method
                # itself (AMQP 0-9-1 exchange.declare, bit 'internal') says it.
                channel.send_method(spec.Exchange.Declare, 'BssbbbbbF',
                                    (0, sub.exchange, sub.exchange_type, False,
                                     sub.exchange_durable, sub.exchange_auto_delete, True,
                                     False, None), wait=spec.Exchange.DeclareOk)
            elif sub.exchange_type:
                channel.exchange_declare(exchange=sub.exchange, type=sub.exchange_type,
                                         durable=sub.exchange_durable,
                                         auto_delete=sub.exchange_auto_delete)
            else:
                channel.exchange_declare(exchange=sub.exchange, type='direct', passive=True)
            for source, key, kind, durable in sub.exchange_bindings:
                if kind:
                    channel.exchange_declare(exchange=source, type=kind, durable=durable,
                                             auto_delete=False)
                channel.exchange_bind(destination=sub.exchange, source=source,
                                      routing_key=key)
        name = sub.queue_name(self.node, sub.index)
        channel.queue_declare(queue=name, passive=sub.passive, durable=sub.durable,
                              exclusive=sub.exclusive, auto_delete=sub.auto_delete,
                              arguments=sub.queue_arguments)
        if sub.exchange:
            for key in sub.routing_keys:
                channel.queue_bind(queue=name, exchange=sub.exchange, routing_key=key)
        no_ack = sub.ack == 'none'
        if not no_ack:
            channel.basic_qos(0, sub.prefetch or self.prefetch, False)
        received = self._received

        def on_message(raw):
            received(sub, channel, raw)

        self.link.consume(channel, name, sub.tag, on_message, no_ack,
                          on_cancel=self._cancelled)
        sub.channel = channel
        sub.queue_in_use = name
        if not sub.renamable:
            self.sweep.watch(sub, name, lambda conn: self._swept(sub, conn))

    def _swept(self, sub, conn):
        """``sub``'s queue was deleted by a cluster's clean-up (see _sweep): declare,
        bind and consume it again. The consumer of the old one drains what it holds."""
        if sub not in self.subscriptions:
            return
        old = sub.channel
        self._setup(sub, conn)
        if old is not None:
            sub.orphans.append(old)

    def _cancelled(self, tag):
        """The broker cancelled a consumer (its queue was deleted): set it up again."""
        self.link.forget_consumer(tag)
        for sub in self.subscriptions:
            if sub.tag == tag:
                log.warning('broker cancelled the consumer of %r; declaring it again', sub)
                sub.channel = None
                if sub.renamable:
                    sub.serial += 1
                self._retry_later(sub, delay=0)

    def _down(self, link, exc):
        for sub in self.subscriptions:
            sub.channel = None
            sub.orphans = []

    def cancel_all(self):
        """Stop deliveries (used by a graceful stop); in-flight ones still settle."""
        for sub in self.subscriptions:
            self._cancel(sub)

    # -- per message ----------------------------------------------------
    def _received(self, sub, channel, raw):
        """Runs in the reading greenlet: decode, then hand to a worker. Never raises:
        whatever the message holds, it is handed on, or counted and rejected."""
        self.stats.consumed += 1
        try:
            info = raw.delivery_info   # may find the exchange or routing key not UTF-8
            bad = getattr(raw, 'bad', None)
            if bad:
                raise BadMessage(bad)
            payload = loads_payload(raw.body)
            stamp_received(payload, self.link.zone)
            names = route_names(payload, sub.event_key, sub.event_subkey, self.event_keys)
            key = None
            if sub.worker_key:
                if sub.worker_key == 'routing_key':
                    key = info.get('routing_key')
                else:
                    key = payload.get(sub.worker_key)
                    if key is None or isinstance(key, (dict, list)):
                        # As the C module's consistent-worker-key: the routing key then.
                        key = info.get('routing_key')
        except BadMessage as exc:
            self._bad(sub, channel, raw, exc)
            return
        except Exception as exc:   # a bug, or input nobody thought of: still settled
            log.exception('cannot decode a message on queue %s', sub.queue_in_use)
            self._bad(sub, channel, raw, exc)
            return
        self.dispatcher.submit(self._handle, (sub, channel, raw, payload, names), key)

    def _bad(self, sub, channel, raw, exc):
        """Count, log (bounded) and reject a message that cannot be handled."""
        self.stats.bad_input += 1
        try:
            info = raw.delivery_info
            exchange, routing_key = info.get('exchange'), info.get('routing_key')
        except Exception:
            exchange = routing_key = '?'
        _logs.bad_input.warning('bad message on queue %s (exchange %s, routing key %s, %d '
                                'bytes): %s%s', sub.queue_in_use, _logs.short(exchange),
                                _logs.short(routing_key), len(raw.body or b''), exc,
                                '; rejected' if sub.ack != 'none' else '')
        self._settle(sub, channel, raw.delivery_tag, False)

    def _unrouted(self, name):
        self.stats.unrouted += 1
        seen = self._unrouted_seen
        if name in seen or len(seen) > UNROUTED_WARN_MAX:
            return
        if len(seen) == UNROUTED_WARN_MAX:
            seen.add(None)
            log.warning('more than %d distinct event routes without a handler; further '
                        'ones are only counted (unrouted)', UNROUTED_WARN_MAX)
            return
        seen.add(name)
        log.warning('no event route for %s (nor its fallbacks); message acked and counted '
                    'as unrouted', _logs.short(name, 200))

    def _handle(self, sub, channel, raw, payload, names):
        """Runs in a worker greenlet. Every message is settled, whatever happens."""
        settled = False
        try:
            route, fn = self.routes.resolve(names)
            if fn is None:
                self._unrouted(names[0])
                settled = True
                self._settle(sub, channel, raw.delivery_tag, True)
                return
            if sub.ack == 'early':
                settled = True
                self._settle(sub, channel, raw.delivery_tag, True)
            info = raw.delivery_info
            link = self.link
            meta = Delivery(route, info.get('exchange'), info.get('routing_key'),
                            sub.queue_in_use, raw.headers or {}, bool(info.get('redelivered')),
                            raw.properties, link.zone, link.host, self.via)
            started = monotonic()
            try:
                fn(payload, meta)
            except Exception as exc:
                self.stats.observe('handler_seconds', route, monotonic() - started)
                self.stats.handler_errors += 1
                # A handler refusing its payload (InvalidPayload) is bad input, said in one
                # line; anything else is a bug in the handler: its traceback.
                refused = isinstance(exc, InvalidPayload)
                log.log(logging.WARNING if refused else logging.ERROR,
                        'event route %s failed (exchange %s, routing key %s)%s%s', route,
                        _logs.short(meta.exchange), _logs.short(meta.routing_key),
                        '; message rejected' if sub.ack == 'late' else '',
                        ': %s' % exc if refused else '', exc_info=not refused)
                if not settled:
                    settled = True
                    self._settle(sub, channel, raw.delivery_tag, False)
                return
            self.stats.observe('handler_seconds', route, monotonic() - started)
            if not settled:
                settled = True
                self._settle(sub, channel, raw.delivery_tag, True)
        except Exception:
            log.exception('cannot handle a message on queue %s', sub.queue_in_use)
            if not settled:
                self._settle(sub, channel, raw.delivery_tag, False)

    def _settle(self, sub, channel, tag, ok):
        if sub.ack == 'none':
            return
        if sub.channel is not channel:
            # Delivered on a connection that is gone: the broker has
            # requeued it already; an ack now would hit the wrong channel.
            self.stats.ack_failed += 1
            return
        link = self.link
        fast = link.fast
        try:
            if ok:
                if fast is not None:
                    link.write(fast.ack, channel.channel_id, tag)
                else:
                    link.write(channel.basic_ack, tag, False)
                self.stats.acked += 1
            else:
                if fast is not None:
                    link.write(fast.reject, channel.channel_id, tag)
                else:
                    link.write(channel.basic_reject, tag, False)
                self.stats.rejected += 1
        except KazooError as exc:
            self.stats.ack_failed += 1
            log.warning('cannot %s message on %s: %s', 'ack' if ok else 'reject',
                        sub.queue_in_use, exc)
