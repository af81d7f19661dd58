"""kazoo_green.metrics: the Prometheus endpoint of a runtime, scraped over HTTP, against the
real broker on 127.0.0.1:5672."""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kazoo_green.metrics import serve

from ..conftest import RABBIT_URL, close_connections, event, unique, wait_for


def scrape(server):
    url = 'http://127.0.0.1:%d/metrics' % server.server_port
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode('utf-8')
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_the_endpoint_shows_the_runtimes_counters_links_and_losses(runtimes):
    exchange = unique('metrics')
    node = unique('kgmetrics') + '@test'
    kz = runtimes(RABBIT_URL, node=node)
    kz.add_route('kazoo:consumer-event-route-req',
                 lambda payload, meta: kz.respond(payload, {'Event-Name': 'resp'}, meta))
    kz.subscribe(exchange, 'route.req')
    kz.start()
    assert kz.wait_connected(10)
    server = serve(kz, port=0)
    try:
        for n in range(3):
            kz.query(exchange, 'route.req', event('route', 'req', N=n), timeout=5)
        samples = scrape(server)
        stats = kz.stats()
        for name in ('published', 'queries', 'queries_ok', 'consumed', 'acked', 'connects'):
            assert samples[('kazoo_green_%s_total' % name, ())] == stats[name], name
        assert samples[('kazoo_green_queries_ok_total', ())] == 3
        # Latency histograms: every answered query by exchange, every handler by route
        # (the handler's own time is taken after it returns: after its reply went out).
        ex = (('exchange', exchange),)
        assert samples[('kazoo_green_query_seconds_count', ex)] == 3
        assert 0 < samples[('kazoo_green_query_seconds_sum', ex)] < 15
        buckets = sorted((float(dict(k[1])['le']), v) for k, v in samples.items()
                         if k[0] == 'kazoo_green_query_seconds_bucket'
                         and dict(k[1])['exchange'] == exchange)
        assert buckets[-1] == (float('inf'), 3)
        assert [v for _, v in buckets] == sorted(v for _, v in buckets)   # cumulative
        route = (('route', 'kazoo:consumer-event-route-req'),)
        assert wait_for(lambda: scrape(server).get(('kazoo_green_handler_seconds_count',
                                                     route)) == 3, 10)
        samples = scrape(server)
        assert samples[('kazoo_green_pending_queries', ())] == 0
        assert samples[('kazoo_green_buffered_publishes', ())] == 0
        brokers = 'amqp://guest@127.0.0.1:5672//'
        assert {k: v for k, v in samples.items() if k[0] == 'kazoo_green_link_up'} == {
            ('kazoo_green_link_up', (('brokers', brokers), ('role', role), ('zone', 'local'))): 1
            for role in ('publish', 'consume')}
        # The broker closes the connections: counted by reason, and seen down or back up.
        assert close_connections(node) >= 2
        assert wait_for(lambda: kz.stats()['reconnects'] >= 2, 15)
        samples = scrape(server)
        lost = {k[1]: v for k, v in samples.items()
                if k[0] == 'kazoo_green_connections_lost_total'}
        assert sum(lost.values()) == kz.stats()['connection_errors'] >= 2, lost
        assert all(labels[0][0] == 'reason' for labels in lost)
    finally:
        server.stop()
