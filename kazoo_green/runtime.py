"""The ``Kazoo`` runtime: one per process, the whole public surface of the core."""

import logging
import signal
from collections import OrderedDict
from time import monotonic

import gevent
from gevent.event import Event

from . import _defaults as D
from ._consume import Subscription
from ._dispatch import Delivery, Dispatcher, RouteTable
from ._stats import Stats
from ._topology import parse_topology
from ._zone import Zone
from ._version import __version__
from .errors import InvalidPayload, KazooError, NotConnected
from .wire import dumps, hostname, route_names, stamp, stamp_received, to_payload

__all__ = ['Kazoo']

log = logging.getLogger('kazoo_green')


class Kazoo(object):
    """An AMQP connector speaking the Kazoo conventions, on gevent + kombu.

    Building one does no I/O (safe before Kamailio forks). Connections are
    made by the process that first uses them:

    * ``publish`` and ``query`` work at once, from any greenlet; without
      ``start()`` the calling greenlet does the socket work itself (this is
      how Kamailio SIP workers use it);
    * ``start()`` (or the blocking ``run()``) adds background readers,
      reconnects, heartbeats and the worker greenlets that run event routes
      for ``subscribe``-d messages.

    ``blocking=True`` makes a caller-driven wait block the whole process in
    ``poll(2)`` instead of switching to gevent's hub: cheaper, and right where
    nothing else runs (Kamailio SIP workers), wrong where other greenlets must
    run meanwhile. It never applies to started (background) connections: a
    connection a caller made is made again when ``start()`` runs.

    ``ssl``: TLS for every broker: True (system CAs, peer and host name
    verified) or a dict of options (``ca_certs``, ``certfile``, ``keyfile``,
    ``cert_reqs``, ``server_hostname``, ``check_hostname``, ``ciphers``, ...);
    ``amqps://`` URLs use TLS with these options (or the defaults) anyway.

    ``brokers`` may name zones (``{'local': [urls], 'dc2': [urls]}``, or the C module's
    ``zone=NAME;url`` entries) and ``zone`` the primary one; ``shape='standalone'`` for
    zones of independent brokers (see README, "Zones"). Publishes and queries go to the
    primary zone unless they name another; ``subscribe(..., federate=True)`` consumes
    in every zone.

    ``fast=False`` leaves every frame to py-amqp (no private hooks of py-amqp are
    used then; see ``_pyamqp``): slower, for a py-amqp release outside the range
    kazoo_green is tested with.

    Example (no broker needed)::

        kz = Kazoo('memory://', app_name='demo')

        @kz.event_route('kazoo:consumer-event-presence-update')
        def presence(payload, meta):
            print(payload['From'], payload['State'])

        kz.subscribe('presence', 'update.*.*', exchange_type='topic')
        kz.start()
        kz.publish('presence', 'update.a.b', {'Event-Category': 'presence',
                   'Event-Name': 'update', 'From': 'alice', 'State': 'busy'})
    """

    def __init__(self, brokers=None, node=None, app_name=D.APP_NAME, app_version=None,
                 query_timeout=D.QUERY_TIMEOUT, workers=D.WORKERS, prefetch=None,
                 publish_buffer=D.PUBLISH_BUFFER, connect_timeout=D.CONNECT_TIMEOUT,
                 heartbeat=D.HEARTBEAT, confirm_timeout=D.CONFIRM_TIMEOUT,
                 direct_reply_to=True, poll_interval=D.POLL_INTERVAL,
                 transport_options=None, blocking=False, ssl=None, fast=True,
                 zone=None, shape='cluster', event_key=D.EVENT_KEY,
                 event_subkey=D.EVENT_SUBKEY):
        specs, self.zone = parse_topology(brokers, zone, shape)
        #: The key fields of routes (C: amqp_consumer_event_key/_subkey): for
        #: subscriptions that name none, connection events, unsolicited messages.
        self.event_keys = (event_key, event_subkey)
        self.app_name = app_name
        self.app_version = app_version or __version__
        self.node = node or '%s@%s' % (app_name, hostname())
        self.query_timeout = query_timeout
        self.confirm_timeout = confirm_timeout
        self._stats = Stats()
        self.routes = RouteTable()
        self.dispatcher = Dispatcher(workers)
        link_args = dict(connect_timeout=connect_timeout, heartbeat=heartbeat,
                         poll_interval=poll_interval, transport_options=transport_options,
                         label=self.node, blocking=blocking, ssl=ssl, fast=fast)
        #: The zones by name, the primary (``zone``) first.
        self.zones = OrderedDict()
        for name in [self.zone] + [n for n in specs if n != self.zone]:
            z = Zone(specs[name], self._stats, self.node, link_args, publish_buffer,
                     direct_reply_to, self.dispatcher, self.routes, prefetch or 2 * workers,
                     self.event_keys)
            z.replies.on_unsolicited = self._unsolicited
            for link in z.links:
                link.on_up(self._link_up)
                link.on_down(self._link_down)
            self.zones[name] = z
        primary = self.zones[self.zone]
        self.urls = primary.urls
        # The primary zone's parts, under the names the single-zone runtime had.
        self._pub_link = primary.pub_link
        self._publisher = primary.publisher
        self._replies = primary.replies
        self._sub_link = primary.feeds[0].link
        self._subscriber = primary.feeds[0].subscriber
        self._subscriptions = []
        self._started = False
        self._stopped = Event()

    def _zone(self, name):
        """The Zone called ``name`` (None: the primary one); ValueError if unknown."""
        if name is None:
            return self.zones[self.zone]
        try:
            return self.zones[name]
        except KeyError:
            raise ValueError('unknown zone %r (zones: %s)' % (name, ', '.join(self.zones))) \
                from None

    # -- sending --------------------------------------------------------
    @staticmethod
    def _timeout(value, default):
        """``value`` seconds, or ``default`` when None (0 means no time at all)."""
        if value is None:
            return default
        if value < 0:
            raise ValueError('timeout must not be negative: %r' % (value,))
        return value

    def _message(self, payload, msg_id=None):
        return stamp(payload, self.app_name, self.app_version, self.node, msg_id)

    def publish(self, exchange, routing_key, payload, headers=None, confirm=False,
                mandatory=False, persistent=False, timeout=None, properties=None,
                zone=None):
        """Publish ``payload`` (a dict or JSON text) and return its ``Msg-ID``.

        It goes to the primary zone's brokers, or to those of ``zone``.

        The envelope fields are stamped when absent. Invalid JSON raises
        InvalidPayload and nothing is sent; a missing exchange raises
        UnknownExchange (exchanges are checked, never declared, here).

        Without ``confirm`` the message is written to the socket, or kept in
        a bounded buffer while no broker is reachable (BufferFull when that
        is full) and sent in order after the reconnect. With ``confirm`` the
        call returns once the broker confirmed it, re-sending it after a
        lost connection, within ``timeout`` (default ``confirm_timeout``).
        """
        z = self._zone(zone)
        return self._publish(z.publisher, exchange, routing_key, payload, headers, confirm,
                             mandatory, persistent, timeout, properties, z.replies)

    def _publish(self, publisher, exchange, routing_key, payload, headers=None, confirm=False,
                 mandatory=False, persistent=False, timeout=None, properties=None,
                 replies=None):
        message = self._message(payload)
        if 'Server-ID' not in message:
            # As the C module: every message says where an answer to it would reach
            # this process (Kazoo applications answer some events that way).
            message['Server-ID'] = (replies or self._replies).server_id
        props = dict(properties) if properties else {}
        if persistent:
            props['delivery_mode'] = 2
        body = dumps(message)
        try:
            if confirm:
                deadline = monotonic() + self._timeout(timeout, self.confirm_timeout)
                publisher.publish_confirmed(exchange, routing_key, body, headers, props,
                                            mandatory, deadline)
            else:
                deadline = monotonic() + self._timeout(timeout, self.query_timeout)
                publisher.publish(exchange, routing_key, body, headers, props,
                                  mandatory, deadline)
        except KazooError:
            self._stats.publish_errors += 1
            raise
        return message['Msg-ID']

    def query(self, exchange, routing_key, payload, timeout=None, headers=None,
              mandatory=True, zone=None):
        """Publish a request and return the reply payload (a dict).

        The request goes to the primary zone, or to ``zone``; its reply comes back
        through the same zone.

        The request carries ``Server-ID`` and ``Msg-ID`` (Kazoo responders)
        and ``reply_to``/``correlation_id`` (generic AMQP responders, on
        RabbitMQ). Raises QueryTimeout when no reply came within ``timeout``
        seconds (default ``query_timeout``) in all, Unroutable when the
        broker had no queue for it, ConnectionLost/NotConnected when the
        broker went away, UnknownExchange for a missing exchange.
        """
        message = self._message(payload)
        replies = self._replies if zone is None else self._zone(zone).replies
        return replies.query(exchange, routing_key, message,
                                   self._timeout(timeout, self.query_timeout), headers,
                                   mandatory)

    def respond(self, request, reply, meta=None):
        """Answer a query consumed by an event route (for responders).

        Uses ``reply_to`` when the request has one (``meta`` needed), else
        the Kazoo style: exchange ``targeted``, routing key ``Server-ID``.
        ``Msg-ID`` is copied from the request. The reply goes back through the
        zone that received the request (``meta.zone``, or the request's
        ``AMQP-Broker-Zone``), and with standalone brokers through the very broker.
        """
        reply = to_payload(reply)
        reply['Msg-ID'] = request.get('Msg-ID')
        z = self.zones[self.zone]
        zone = meta.zone if meta is not None else None
        zone = zone or request.get('AMQP-Broker-Zone')
        if isinstance(zone, str) and zone in self.zones:
            z = self.zones[zone]
        publisher = z.publisher
        if meta is not None and meta.via is not None:
            publisher = meta.via
        properties = meta.properties if meta is not None else {}
        reply_to = properties.get('reply_to')
        if reply_to:
            return self._publish(publisher, '', reply_to, reply,
                                 properties={'correlation_id': properties.get('correlation_id')},
                                 replies=z.replies)
        server_id = request.get('Server-ID')
        if isinstance(server_id, str) and server_id:
            if server_id.startswith('consumer://'):
                # Forwarded by a C kazoo module, which rewrites Server-ID on consume to
                # consumer://<its server>/<Server-ID>: the part after the prefix.
                server_id = server_id.split('/', 3)[-1]
            return self._publish(publisher, D.TARGETED_EXCHANGE, server_id, reply,
                                 replies=z.replies)
        raise KazooError('request has neither reply_to nor Server-ID to answer to')

    # -- consuming ------------------------------------------------------
    def subscribe(self, exchange, routing_key, queue=None, exchange_type='direct', ack='late',
                  durable=False, auto_delete=None, exclusive=False, passive=False,
                  queue_arguments=None, exchange_durable=False, prefetch=None,
                  event_key=None, event_subkey=None, worker_key=None,
                  federate=False, exchange_auto_delete=False, exchange_internal=False,
                  exchange_bindings=None):
        """Consume ``queue`` bound to ``exchange`` with ``routing_key`` (a key or a list).

        Each message runs the event route chosen from its payload (see
        ``event_route``). ``ack='late'`` acks after the handler returned and
        rejects (dead-letters, with a DLX in ``queue_arguments``) when it
        raised; ``'early'`` acks just before the handler runs; ``'none'``
        consumes without acks. ``worker_key`` (a payload field, or
        ``'routing_key'``) sends equal values to the same worker, in order.
        ``exchange_type=None`` requires the exchange to exist already.
        ``event_key``/``event_subkey``: the payload fields that choose the route
        (default ``Event-Category``/``Event-Name``; see ``wire.route_names``).

        It is consumed in the primary zone, from every zone with ``federate``
        (from each broker of a standalone zone). ``exchange_auto_delete`` and
        ``exchange_internal`` are the exchange's flags; ``exchange_bindings`` binds
        other exchanges to it: ``[{'exchange': SOURCE, 'routing_key': KEY or [KEYS],
        'type': TYPE}]`` (with ``type`` the source is declared too).
        """
        sub = Subscription(exchange, routing_key, queue=queue, exchange_type=exchange_type,
                           durable=durable, auto_delete=auto_delete, exclusive=exclusive,
                           passive=passive, queue_arguments=queue_arguments,
                           exchange_durable=exchange_durable, ack=ack, prefetch=prefetch,
                           event_key=event_key, event_subkey=event_subkey,
                           worker_key=worker_key, exchange_auto_delete=exchange_auto_delete,
                           exchange_internal=exchange_internal,
                           exchange_bindings=exchange_bindings, federate=federate)
        sub.index = len(self._subscriptions)
        zones = list(self.zones.values()) if federate else [self.zones[self.zone]]
        targets = [(feed, sub.copy_for(z.name)) for z in zones for feed in z.feeds]
        copies = [twin for _, twin in targets]
        added = []
        try:
            for feed, twin in targets:
                twin.copies = copies
                feed.subscriber.add(twin)
                added.append((feed, twin))
        except KazooError:
            for feed, twin in added:
                feed.subscriber.remove(twin)
            raise
        self._subscriptions.append(sub)
        if self._started:
            for feed, _ in added:
                feed.link.start()
        return copies[0]

    def event_route(self, name):
        """Decorator: run ``fn(payload, meta)`` for messages routed to ``name``.

        ``meta`` is a Delivery (route, exchange, routing_key, queue, headers,
        redelivered, properties).
        """
        def register(fn):
            self.routes.add(name, fn)
            return fn
        return register

    def add_route(self, name, fn):
        self.routes.add(name, fn)

    # -- connection events ---------------------------------------------
    def _link_up(self, link):
        self._connection_event('open', link)

    def _link_down(self, link, exc):
        self._connection_event('closed', link, exc)

    def _connection_event(self, state, link, exc=None):
        if not self.dispatcher.running:
            return
        # The C module's fields (host, zone), and kazoo_green's (Host: host:port, Link).
        payload = {self.event_keys[0]: 'connection', self.event_keys[1]: state,
                   'host': link.hostname, 'zone': link.zone, 'Host': link.host,
                   'Link': link.name}
        if exc is not None:
            payload['Reason'] = str(exc)
        names = route_names(payload, defaults=self.event_keys)
        meta = Delivery(None, None, None, None, {}, False, {}, link.zone, link.host)
        self.dispatcher.submit(self._run_event, (names, payload, meta))

    def _unsolicited(self, payload, message, link):
        """A message on a reply queue that answers no query: run as an event, as the C
        module does with what reaches its targeted queue. False where no workers run
        (caller-driven processes: the caller counts it)."""
        if not self.dispatcher.running:
            return False
        self._stats.unsolicited += 1
        zone = link.zone
        stamp_received(payload, zone)
        try:
            info = message.delivery_info
        except Exception:
            info = {}
        meta = Delivery(None, info.get('exchange'), info.get('routing_key'), None,
                        getattr(message, 'headers', None) or {}, False,
                        getattr(message, 'properties', None) or {}, zone, link.host)
        self.dispatcher.submit(self._run_event,
                               (route_names(payload, defaults=self.event_keys), payload, meta))
        return True

    def _run_event(self, names, payload, meta):
        route, fn = self.routes.resolve(names)
        if fn is None:
            return
        meta.route = route
        started = monotonic()
        try:
            fn(payload, meta)
        except InvalidPayload as exc:   # the handler refused its payload: one line
            self._stats.handler_errors += 1
            log.warning('event route %s failed: %s', route, exc)
        except Exception:
            self._stats.handler_errors += 1
            log.exception('event route %s failed', route)
        self._stats.observe('handler_seconds', route, monotonic() - started)

    def _links(self, started=False):
        """Every link, or those a started runtime runs (publishing, and consuming where
        there is something to consume)."""
        out = []
        for z in self.zones.values():
            out.append(z.pub_link)
            out.extend(z.consume_links() if started else [f.link for f in z.feeds])
        return out

    # -- life cycle -----------------------------------------------------
    def start(self):
        """Start the worker greenlets and background readers (returns at once)."""
        if self._started:
            return
        self._started = True
        self._stopped.clear()
        self.dispatcher.start()
        for link in self._links(started=True):
            link.start()

    def stop(self, timeout=D.STOP_TIMEOUT):
        """Stop gracefully: no new deliveries, in-flight handlers finish and settle.

        On a runtime that was never started this closes its connections.
        """
        if not self._started:
            for z in self.zones.values():
                for link in [z.pub_link] + z.replies.via_links:
                    link.stop()
            return
        for z in self.zones.values():
            for feed in z.feeds:
                feed.subscriber.cancel_all()
        if not self.dispatcher.join(timeout):
            log.warning('stop: handlers still running after %.1fs; their messages will be '
                        'redelivered', timeout)
        self.dispatcher.stop()
        for z in self.zones.values():
            for link in [feed.link for feed in z.feeds] + [z.pub_link] + z.replies.via_links:
                link.stop()
        self._started = False
        self._stopped.set()

    def run(self):
        """start(), then block until stop() or SIGTERM/SIGINT (for consumer processes)."""
        self.start()
        handlers = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                handlers.append(gevent.signal_handler(sig, gevent.spawn, self.stop))
            except (ValueError, OSError):  # not the main thread, or not allowed
                pass
        try:
            self._stopped.wait()
        finally:
            for h in handlers:
                h.cancel()

    def wait_connected(self, timeout=5.0):
        """Block until the started links are up; returns whether they are."""
        deadline = monotonic() + timeout
        links = self._links(started=True)
        for link in links:
            while not link.connected and monotonic() < deadline:
                gevent.sleep(0.01)
        return all(link.connected for link in links)

    def connect(self, timeout=None, zone=None):
        """Connect the publishing link of ``zone`` (default: the primary one) now, so the
        first publish or query does not pay for it; raises NotConnected when no broker
        answered within ``timeout`` seconds (default: ``connect_timeout`` per broker).
        In a started runtime this waits for its reader to connect."""
        z = self._zone(zone)
        link = z.pub_link
        if timeout is None:
            timeout = link.connect_timeout * len(link.urls)
        deadline = monotonic() + self._timeout(timeout, 0)
        link.ensure(deadline, wait=True)
        if link._reader is None:
            # Standalone brokers: the reply-only links too, so that the first query's
            # reply may come through any broker (one that is down is no error here).
            for via in z.replies.via_links:
                try:
                    via.ensure(deadline)
                except NotConnected:
                    pass

    # -- introspection --------------------------------------------------
    @property
    def server_id(self):
        """The routing key on ``targeted`` where this process receives replies."""
        return self._replies.server_id

    @property
    def connected(self):
        return self._pub_link.connected

    def stats(self):
        """Counters (see ``kazoo_green._stats.COUNTERS``) plus current gauges."""
        stats = self._stats.as_dict()
        zones = self.zones.values()
        stats['pending_queries'] = sum(z.replies.pending for z in zones)
        stats['buffer_size'] = sum(z.publisher.buffered for z in zones)
        stats['publish_connected'] = self._pub_link.connected
        stats['consume_connected'] = self._sub_link.connected
        return stats

    def histograms(self):
        """Latency histograms of this process: ``{'query_seconds': {exchange: h},
        'handler_seconds': {route: h}}``, each ``h`` a dict with ``buckets`` (cumulative
        ``(upper bound in seconds, count)`` pairs, ``float('inf')`` last), ``sum`` and
        ``count``. Answered queries only (timeouts: ``queries_timeout``); handlers that
        raised too.

        >>> kz = Kazoo('memory://')
        >>> kz.histograms()
        {'query_seconds': {}, 'handler_seconds': {}}
        """
        out = {}
        for name in ('query_seconds', 'handler_seconds'):
            out[name] = {key: {'buckets': h.cumulative(), 'sum': h.sum, 'count': h.count}
                         for key, h in getattr(self._stats, name).items()}
        return out

    def links(self):
        """One dict per connection: ``zone``, ``role`` (publish/consume), ``brokers`` (its
        URLs, without passwords), ``connected``, ``host`` (host:port when connected)."""
        return [{'zone': link.zone, 'role': link.name, 'brokers': link.describe(),
                 'connected': link.connected, 'host': link.host if link.connected else None}
                for link in self._links()]
