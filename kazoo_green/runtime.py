"""The ``Kazoo`` runtime: one per process, the whole public surface of the core."""

import logging
import signal
from time import monotonic

import gevent
from gevent.event import Event

from . import _defaults as D
from ._consume import Subscriber, Subscription
from ._dispatch import Delivery, Dispatcher, RouteTable
from ._link import Link, parse_brokers
from ._publish import Publisher
from ._query import ReplyWaiter
from ._stats import Stats
from ._version import __version__
from .errors import KazooError
from .wire import dumps, hostname, route_names, stamp, to_payload

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
                 transport_options=None, blocking=False, ssl=None, fast=True):
        self.urls = parse_brokers(brokers)
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
        self._pub_link = Link('publish', self.urls, self._stats, **link_args)
        self._publisher = Publisher(self._pub_link, self._stats, publish_buffer)
        self._replies = ReplyWaiter(self._pub_link, self._publisher, self._stats, self.node,
                                    direct_reply_to=direct_reply_to)
        self._sub_link = Link('consume', self.urls, self._stats, **link_args)
        self._subscriber = Subscriber(self._sub_link, self.dispatcher, self.routes,
                                      self._stats, self.node, prefetch or 2 * workers)
        for link in (self._pub_link, self._sub_link):
            link.on_up(self._link_up)
            link.on_down(self._link_down)
        self._started = False
        self._stopped = Event()

    # -- sending --------------------------------------------------------
    @staticmethod
    def _timeout(value, default):
        """``value`` seconds, or ``default`` when None (0 means no time at all)."""
        if value is None:
            return default
        if value < 0:
            raise ValueError('timeout must not be negative: %r' % (value,))
        return value

    def _message(self, payload):
        return stamp(payload, self.app_name, self.app_version, self.node)

    def publish(self, exchange, routing_key, payload, headers=None, confirm=False,
                mandatory=False, persistent=False, timeout=None, properties=None):
        """Publish ``payload`` (a dict or JSON text) and return its ``Msg-ID``.

        The envelope fields are stamped when absent. Invalid JSON raises
        InvalidPayload and nothing is sent; a missing exchange raises
        UnknownExchange (exchanges are checked, never declared, here).

        Without ``confirm`` the message is written to the socket, or kept in
        a bounded buffer while no broker is reachable (BufferFull when that
        is full) and sent in order after the reconnect. With ``confirm`` the
        call returns once the broker confirmed it, re-sending it after a
        lost connection, within ``timeout`` (default ``confirm_timeout``).
        """
        message = self._message(payload)
        props = dict(properties) if properties else {}
        if persistent:
            props['delivery_mode'] = 2
        body = dumps(message)
        try:
            if confirm:
                deadline = monotonic() + self._timeout(timeout, self.confirm_timeout)
                self._publisher.publish_confirmed(exchange, routing_key, body, headers, props,
                                                  mandatory, deadline)
            else:
                deadline = monotonic() + self._timeout(timeout, self.query_timeout)
                self._publisher.publish(exchange, routing_key, body, headers, props,
                                        mandatory, deadline)
        except KazooError:
            self._stats.publish_errors += 1
            raise
        return message['Msg-ID']

    def query(self, exchange, routing_key, payload, timeout=None, headers=None,
              mandatory=True):
        """Publish a request and return the reply payload (a dict).

        The request carries ``Server-ID`` and ``Msg-ID`` (Kazoo responders)
        and ``reply_to``/``correlation_id`` (generic AMQP responders, on
        RabbitMQ). Raises QueryTimeout when no reply came within ``timeout``
        seconds (default ``query_timeout``) in all, Unroutable when the
        broker had no queue for it, ConnectionLost/NotConnected when the
        broker went away, UnknownExchange for a missing exchange.
        """
        message = self._message(payload)
        return self._replies.query(exchange, routing_key, message,
                                   self._timeout(timeout, self.query_timeout), headers,
                                   mandatory)

    def respond(self, request, reply, meta=None):
        """Answer a query consumed by an event route (for responders).

        Uses ``reply_to`` when the request has one (``meta`` needed), else
        the Kazoo style: exchange ``targeted``, routing key ``Server-ID``.
        ``Msg-ID`` is copied from the request.
        """
        reply = to_payload(reply)
        reply['Msg-ID'] = request.get('Msg-ID')
        properties = meta.properties if meta is not None else {}
        reply_to = properties.get('reply_to')
        if reply_to:
            return self.publish('', reply_to, reply,
                                properties={'correlation_id': properties.get('correlation_id')})
        if request.get('Server-ID'):
            return self.publish(D.TARGETED_EXCHANGE, request['Server-ID'], reply)
        raise KazooError('request has neither reply_to nor Server-ID to answer to')

    # -- consuming ------------------------------------------------------
    def subscribe(self, exchange, routing_key, queue=None, exchange_type='direct', ack='late',
                  durable=False, auto_delete=None, exclusive=False, passive=False,
                  queue_arguments=None, exchange_durable=False, prefetch=None,
                  event_key=D.EVENT_KEY, event_subkey=D.EVENT_SUBKEY, worker_key=None):
        """Consume ``queue`` bound to ``exchange`` with ``routing_key`` (a key or a list).

        Each message runs the event route chosen from its payload (see
        ``event_route``). ``ack='late'`` acks after the handler returned and
        rejects (dead-letters, with a DLX in ``queue_arguments``) when it
        raised; ``'early'`` acks just before the handler runs; ``'none'``
        consumes without acks. ``worker_key`` (a payload field, or
        ``'routing_key'``) sends equal values to the same worker, in order.
        ``exchange_type=None`` requires the exchange to exist already.
        """
        sub = Subscription(exchange, routing_key, queue=queue, exchange_type=exchange_type,
                           durable=durable, auto_delete=auto_delete, exclusive=exclusive,
                           passive=passive, queue_arguments=queue_arguments,
                           exchange_durable=exchange_durable, ack=ack, prefetch=prefetch,
                           event_key=event_key, event_subkey=event_subkey,
                           worker_key=worker_key)
        self._subscriber.add(sub)
        if self._started:
            self._sub_link.start()
        return sub

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
        payload = {'Event-Category': 'connection', 'Event-Name': state,
                   'Host': link.host, 'Link': link.name}
        if exc is not None:
            payload['Reason'] = str(exc)
        names = route_names(payload)
        meta = Delivery(None, None, None, None, {}, False, {})
        self.dispatcher.submit(self._run_event, (names, payload, meta))

    def _run_event(self, names, payload, meta):
        route, fn = self.routes.resolve(names)
        if fn is None:
            return
        meta.route = route
        try:
            fn(payload, meta)
        except Exception:
            self._stats.handler_errors += 1
            log.exception('event route %s failed', route)

    # -- life cycle -----------------------------------------------------
    def start(self):
        """Start the worker greenlets and background readers (returns at once)."""
        if self._started:
            return
        self._started = True
        self._stopped.clear()
        self.dispatcher.start()
        self._pub_link.start()
        if self._subscriber.subscriptions:
            self._sub_link.start()

    def stop(self, timeout=D.STOP_TIMEOUT):
        """Stop gracefully: no new deliveries, in-flight handlers finish and settle.

        On a runtime that was never started this closes its connection.
        """
        if not self._started:
            self._pub_link.stop()
            return
        self._subscriber.cancel_all()
        if not self.dispatcher.join(timeout):
            log.warning('stop: handlers still running after %.1fs; their messages will be '
                        'redelivered', timeout)
        self.dispatcher.stop()
        self._sub_link.stop()
        self._pub_link.stop()
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
        links = [self._pub_link] + ([self._sub_link] if self._subscriber.subscriptions else [])
        for link in links:
            while not link.connected and monotonic() < deadline:
                gevent.sleep(0.01)
        return all(link.connected for link in links)

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
        stats['pending_queries'] = self._replies.pending
        stats['buffer_size'] = self._publisher.buffered
        stats['publish_connected'] = self._pub_link.connected
        stats['consume_connected'] = self._sub_link.connected
        return stats
