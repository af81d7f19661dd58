"""Event routes: the name table, and the worker greenlets that run handlers."""

import logging

import gevent
from gevent.queue import Queue

from .wire import normalise_route

__all__ = ['RouteTable', 'Dispatcher', 'Delivery']

log = logging.getLogger('kazoo_green')


class Delivery(object):
    """What a handler learns about a consumed message besides its payload.

    ``zone`` is the zone of the connection that received it (also stamped into the
    payload as ``AMQP-Broker-Zone``) and ``broker`` that connection's ``host:port``.
    """

    __slots__ = ('route', 'exchange', 'routing_key', 'queue', 'headers', 'redelivered',
                 'properties', 'zone', 'broker', 'via')

    def __init__(self, route, exchange, routing_key, queue, headers, redelivered,
                 properties, zone=None, broker=None, via=None):
        self.route = route
        self.exchange = exchange
        self.routing_key = routing_key
        self.queue = queue
        self.headers = headers
        self.redelivered = redelivered
        self.properties = properties
        self.zone = zone
        self.broker = broker
        #: The Publisher of the connection that received it, where a reply must go back
        #: through that very connection (standalone brokers); else None.
        self.via = via

    def __repr__(self):
        return '<Delivery %s %s/%s%s%s>' % (self.route, self.exchange, self.routing_key,
                                            ' zone=%s' % self.zone if self.zone else '',
                                            ' redelivered' if self.redelivered else '')


class RouteTable(object):
    """Handlers by normalised event-route name."""

    def __init__(self):
        self._routes = {}

    def add(self, name, fn):
        self._routes[normalise_route(name)] = fn

    def remove(self, name):
        self._routes.pop(normalise_route(name), None)

    def resolve(self, names):
        """First defined route of ``names`` (most specific first): (name, fn) or (None, None)."""
        routes = self._routes
        for name in names:
            fn = routes.get(name)
            if fn is not None:
                return name, fn
        return None, None


class _Lane(object):
    __slots__ = ('queue', 'busy', 'greenlet')

    def __init__(self):
        self.queue = Queue()
        self.busy = False
        self.greenlet = None

    def load(self):
        return self.queue.qsize() + self.busy


class Dispatcher(object):
    """``workers`` greenlets, each serving its own lane of jobs in order.

    A job with a key always goes to the same lane (the consistent worker:
    jobs for one entity run in order); a job without one goes to the least
    loaded lane. The reading greenlet only enqueues, it never waits here.
    """

    def __init__(self, workers):
        if workers < 1:
            raise ValueError('workers must be at least 1')
        self.lanes = [_Lane() for _ in range(workers)]
        self.running = False

    def start(self):
        if self.running:
            return
        self.running = True
        for i, lane in enumerate(self.lanes):
            lane.greenlet = gevent.spawn(self._work, lane)
            lane.greenlet.name = 'kazoo_green-worker-%d' % i

    def submit(self, fn, args, key=None):
        lanes = self.lanes
        if key is not None:
            lane = lanes[hash(key) % len(lanes)]
        else:
            lane = lanes[0]
            if lane.busy or lane.queue.qsize():
                lane = min(lanes, key=_Lane.load)
        lane.queue.put((fn, args))

    def idle(self):
        return all(not lane.busy and not lane.queue.qsize() for lane in self.lanes)

    def join(self, timeout):
        """Wait until every lane is empty and idle; returns whether it is."""
        with gevent.Timeout(timeout, False):
            while not self.idle():
                gevent.sleep(0.01)
        return self.idle()

    def stop(self, timeout=1.0):
        self.running = False
        for lane in self.lanes:
            lane.queue.put(None)
        greenlets = [lane.greenlet for lane in self.lanes if lane.greenlet is not None]
        gevent.joinall(greenlets, timeout=timeout)
        gevent.killall([g for g in greenlets if not g.dead], block=False)
        for lane in self.lanes:
            lane.greenlet = None
            lane.queue = Queue()
            lane.busy = False

    @staticmethod
    def _work(lane):
        queue = lane.queue
        while True:
            job = queue.get()
            if job is None:
                return
            lane.busy = True
            try:
                job[0](*job[1])
            except Exception:
                # Jobs handle their own errors; this keeps the worker alive
                # if one does not.
                log.exception('worker job failed')
            finally:
                lane.busy = False
