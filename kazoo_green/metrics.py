"""Prometheus metrics of a runtime outside Kamailio (responders, consumers like
``examples/responder.py``), on an address the application chooses.

Needs the optional extra: ``pip install kazoo_green[prometheus]`` (prometheus_client).
Everything is read from the runtime when the endpoint is scraped (``Kazoo.stats()``,
``Kazoo.links()``, ``Kazoo.histograms()``): nothing is added to the paths of publishes,
queries or deliveries.

    import kazoo_green
    from kazoo_green import Kazoo
    from kazoo_green.metrics import serve

    kz = Kazoo('amqp://guest:guest@127.0.0.1:5672//', app_name='responder')
    server = serve(kz, port=9108)          # http://127.0.0.1:9108/metrics
    kz.run()

Names: ``kazoo_green_<counter>_total`` for every counter of ``Kazoo.stats()`` (see
``kazoo_green._stats``), ``kazoo_green_pending_queries``, ``kazoo_green_buffered_publishes``
(gauges), ``kazoo_green_link_up{zone, role, brokers}`` (1 connected, 0 not; one series per
connection), ``kazoo_green_connections_lost_total{reason}`` (the kind of error),
``kazoo_green_query_seconds{exchange}`` and ``kazoo_green_handler_seconds{route}``
(histograms: answered queries, event-route handlers). Inside Kamailio the same names, with
xhttp_prom's ``kamailio_`` prefix, come from Kamailio itself (``kazoo_green._kamstats``).
"""

try:
    from prometheus_client import CollectorRegistry, make_wsgi_app
    from prometheus_client.core import (
        CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
    )
except ImportError as exc:   # pragma: no cover - the extra is not installed
    raise ImportError('kazoo_green.metrics needs prometheus_client: '
                      'pip install kazoo_green[prometheus]') from exc

from ._stats import COUNTERS, DOCS, HISTOGRAMS

__all__ = ['Collector', 'registry', 'serve']

PREFIX = 'kazoo_green_'


class Collector(object):
    """A prometheus_client collector of one runtime's counters and gauges."""

    def __init__(self, kz):
        self.kz = kz

    def describe(self):
        return []   # collected on demand only: no help text to check at registration

    def collect(self):
        kz = self.kz
        stats = kz.stats()
        for name in COUNTERS:
            yield CounterMetricFamily(PREFIX + name, DOCS[name], value=stats[name])
        yield GaugeMetricFamily(PREFIX + 'pending_queries', 'queries waiting for a reply',
                                value=stats['pending_queries'])
        yield GaugeMetricFamily(PREFIX + 'buffered_publishes',
                                'publishes kept while no broker is reachable',
                                value=stats['buffer_size'])
        up = GaugeMetricFamily(PREFIX + 'link_up', 'a connection is up (1) or not (0)',
                               labels=['zone', 'role', 'brokers'])
        for link in kz.links():
            up.add_metric([link['zone'], link['role'], link['brokers']],
                          1 if link['connected'] else 0)
        yield up
        lost = CounterMetricFamily(PREFIX + 'connections_lost',
                                   'connections lost, by the kind of error', labels=['reason'])
        for reason, count in sorted(kz._stats.lost_reasons.items()):
            lost.add_metric([reason], count)
        yield lost
        histograms = kz.histograms()
        for name, (label, doc) in sorted(HISTOGRAMS.items()):
            family = HistogramMetricFamily(PREFIX + name, doc, labels=[label])
            for key, h in sorted(histograms[name].items()):
                family.add_metric([key], [(_bound(b), n) for b, n in h['buckets']],
                                  sum_value=h['sum'])
            yield family


def _bound(bound):
    return '+Inf' if bound == float('inf') else repr(bound)


def registry(kz):
    """A CollectorRegistry holding only ``kz``'s metrics."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(kz))
    return reg


def serve(kz, port, addr='127.0.0.1', registry_=None):
    """Serve ``kz``'s metrics (text format) at ``http://addr:port/`` (any path) from a
    gevent WSGI server in this process; returns the started server (``server.stop()``).
    ``port=0`` picks a free port: ``server.server_port``."""
    from gevent.pywsgi import WSGIServer
    app = make_wsgi_app(registry_ or registry(kz))
    server = WSGIServer((addr, port), app, log=None, error_log=None)
    server.start()
    return server
