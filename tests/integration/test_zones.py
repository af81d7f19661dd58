"""Zones, federation and standalone brokers on independent RabbitMQ nodes (tests.standalone).

Node 1 (127.0.0.1:5691) and node 2 (127.0.0.1:5692) know nothing of each other: used as
two zones (``local`` and ``dc2``), and as one zone of two standalone brokers.
"""

from collections import Counter

import gevent
import pytest

from kazoo_green import NotConnected, QueryTimeout

from ..conftest import event, unique, wait_for
from ..standalone import running_standalone, standalone  # noqa: F401

pytestmark = pytest.mark.usefixtures('running_standalone')

DEAD_URL = 'amqp://guest:guest@127.0.0.1:5699//'   # nothing listens there


@pytest.fixture
def nodes(running_standalone):  # noqa: F811
    return running_standalone


def two_zones(nodes, **kwargs):
    return dict(url={'local': [nodes.url(1)], 'dc2': [nodes.url(2)]}, **kwargs)


def one_standalone_zone(nodes, **kwargs):
    return dict(url={'local': {'urls': nodes.urls, 'shape': 'standalone'}}, **kwargs)


def collect(kz, route):
    seen = []
    kz.add_route(route, lambda payload, meta: seen.append((payload, meta)))
    return seen


def started(kz, timeout=15):
    kz.start()
    assert kz.wait_connected(timeout), kz.links()
    return kz


def test_the_c_module_connection_strings_are_accepted(runtimes, nodes):
    kz = runtimes('%s;zone=dc2;%s' % (nodes.url(1), nodes.url(2).replace('amqp://', 'kazoo://')))
    assert list(kz.zones) == ['local', 'dc2']
    assert kz.zones['dc2'].urls == [nodes.url(2)]
    kz2 = runtimes(['zone=dc2;%s' % nodes.url(2), nodes.url(1)], zone='dc2')
    assert (kz2.zone, list(kz2.zones)) == ('dc2', ['dc2', 'local'])
    with pytest.raises(ValueError):
        runtimes(nodes.url(1), zone='nowhere')


def test_federated_subscription_consumes_every_zone_and_plain_only_the_primary(runtimes, nodes):
    exchange = unique('zfed')
    kz = runtimes(**two_zones(nodes))
    fed = collect(kz, 'kazoo:consumer-event-fed')
    local = collect(kz, 'kazoo:consumer-event-plain')
    kz.subscribe(exchange, 'fed', federate=True)
    plain = kz.subscribe(exchange, 'plain')
    started(kz)
    for zone in ('local', 'dc2'):
        kz.publish(exchange, 'fed', event('fed', 'x', From=zone), zone=zone)
        kz.publish(exchange, 'plain', event('plain', 'x', From=zone), zone=zone)
    assert wait_for(lambda: len(fed) == 2 and len(local) == 1, 10), (fed, local)
    # Every message says which zone received it: in meta and stamped like the C module.
    assert sorted((p['From'], m.zone, p['AMQP-Broker-Zone']) for p, m in fed) == [
        ('dc2', 'dc2', 'dc2'), ('local', 'local', 'local')]
    assert all(isinstance(p['AMQP-Received'], int) for p, _ in fed)
    # Not federated: consumed in the primary zone only; in dc2 no queue is bound for it
    # (the broker drops the message published there).
    queue = plain.queue_in_use
    assert [c.zone for c in plain.copies] == ['local']
    assert queue in nodes.queues(1) and queue not in nodes.queues(2)
    assert [(p['From'], m.zone) for p, m in local] == [('local', 'local')]
    assert {m.broker for _, m in fed} == {'127.0.0.1:%d' % nodes.port(1),
                                          '127.0.0.1:%d' % nodes.port(2)}


def test_a_query_to_another_zone_is_answered_there(runtimes, nodes):
    exchange = unique('zq')
    responder = runtimes(nodes.url(2), zone=None)    # a Kazoo app living in dc2 only

    @responder.event_route('kazoo:consumer-event-route-req')
    def answer(payload, meta):
        responder.respond(payload, {'Event-Category': 'route', 'Event-Name': 'resp',
                                    'Answered-By': 'dc2'}, meta)

    responder.subscribe(exchange, 'route.req')
    started(responder)
    kz = runtimes(**two_zones(nodes))
    started(kz)
    reply = kz.query(exchange, 'route.req', event('route', 'req'), zone='dc2', timeout=5)
    assert reply['Answered-By'] == 'dc2'
    with pytest.raises(Exception):   # no such exchange in the primary zone's node
        kz.query(exchange, 'route.req', event('route', 'req'), timeout=1)


@pytest.mark.parametrize('direct_reply_to', [False, True], ids=['server-id', 'reply-to'])
def test_a_reply_goes_back_through_the_zone_the_request_came_from(runtimes, nodes,
                                                                  direct_reply_to):
    exchange = unique('zback')
    # The responder's primary zone is local (node 1); the request reaches it in dc2.
    responder = runtimes(**two_zones(nodes))

    @responder.event_route('kazoo:consumer-event-route-req')
    def answer(payload, meta):
        assert meta.zone == 'dc2'
        responder.respond(payload, {'Event-Category': 'route', 'Event-Name': 'resp',
                                    'Seen-In': payload['AMQP-Broker-Zone']}, meta)

    responder.subscribe(exchange, 'route.req', federate=True)
    started(responder)
    # The requester knows only node 2: a reply sent through node 1 could never reach it.
    kz = runtimes(nodes.url(2), direct_reply_to=direct_reply_to)
    reply = kz.query(exchange, 'route.req', event('route', 'req'), timeout=5)
    assert reply['Seen-In'] == 'dc2'


def test_respond_without_meta_uses_the_stamped_zone(runtimes, nodes):
    exchange = unique('zstamp')
    responder = runtimes(**two_zones(nodes))

    @responder.event_route('kazoo:consumer-event-route-req')
    def answer(payload, meta):
        responder.respond(payload, {'Event-Category': 'route', 'Event-Name': 'resp'})

    responder.subscribe(exchange, 'route.req', federate=True)
    started(responder)
    kz = runtimes(nodes.url(2), direct_reply_to=False)
    assert kz.query(exchange, 'route.req', event('route', 'req'), timeout=5)['Event-Name'] == \
        'resp'


def test_connection_events_name_the_zone_and_the_host(runtimes, nodes):
    kz = runtimes(**two_zones(nodes))
    opened = collect(kz, 'kazoo:consumer-event-connection-open')
    kz.subscribe(unique('zev'), 'x', federate=True)
    started(kz)
    # publish + consume link in each of the two zones
    assert wait_for(lambda: len(opened) >= 4, 10), opened
    assert {(p['zone'], p['host'], p['Link']) for p, _ in opened} == {
        ('local', '127.0.0.1', 'publish'), ('local', '127.0.0.1', 'consume'),
        ('dc2', '127.0.0.1', 'publish'), ('dc2', '127.0.0.1', 'consume')}
    assert {m.zone for _, m in opened} == {'local', 'dc2'}


def test_an_event_published_on_either_standalone_broker_is_consumed_once(runtimes, nodes):
    exchange = unique('zsa')
    kz = runtimes(**one_standalone_zone(nodes))
    seen = collect(kz, 'kazoo:consumer-event-sa')
    sub = kz.subscribe(exchange, 'sa', exchange_type='topic')
    started(kz)
    assert len(kz.zones['local'].feeds) == 2
    for i in (1, 2):
        sender = runtimes(nodes.url(i))
        for n in range(5):
            sender.publish(exchange, 'sa', event('sa', 'x', N='%d-%d' % (i, n)))
        sender.publish(exchange, 'sa', event('sa', 'x', N='%d-last' % i))
    # Each broker's messages come in order through its one queue: once both last ones are
    # in, so is any copy of the others. One queue per broker, and it is empty.
    assert wait_for(lambda: {'1-last', '2-last'} <= {p['N'] for p, _ in seen}, 10), len(seen)
    queue = sub.queue_in_use
    assert {c.queue_in_use for c in sub.copies} == {queue}
    for i in (1, 2):
        assert wait_for(lambda: nodes.queues(i).get(queue) == (0, 0), 10), nodes.queues(i)
        assert [q for q in nodes.queues(i) if q.startswith(queue.rsplit('-', 1)[0])] == [queue]
    counts = Counter(p['N'] for p, _ in seen)
    assert sorted(counts) == sorted('%d-%s' % (i, n) for i in (1, 2)
                                    for n in list(range(5)) + ['last'])
    assert set(counts.values()) == {1}
    assert {m.broker for _, m in seen} == {'127.0.0.1:%d' % nodes.port(i) for i in (1, 2)}


@pytest.mark.parametrize('mode', ['started', 'caller-driven', 'caller-driven-blocking'])
def test_a_query_reply_may_come_through_the_other_standalone_broker(runtimes, nodes, mode):
    exchange = unique('zsaq')
    # Consumes requests on node 1, but publishes (replies) through node 2, as a Kazoo
    # application holding connections to both brokers may.
    consumer = runtimes(nodes.url(1))
    replier = runtimes(nodes.url(2))

    @consumer.event_route('kazoo:consumer-event-route-req')
    def answer(payload, meta):
        replier.publish('targeted', payload['Server-ID'],
                        {'Event-Category': 'route', 'Event-Name': 'resp',
                         'Msg-ID': payload['Msg-ID'], 'Via': 'node2'})

    consumer.subscribe(exchange, 'route.req')
    started(consumer)
    replier.publish('targeted', 'nobody', {'Event-Category': 'x', 'Event-Name': 'y'})
    kz = runtimes(**one_standalone_zone(nodes, blocking=mode.endswith('blocking')))
    if mode == 'started':
        kz.subscribe(unique('zsaq-other'), 'x')   # any subscription: consuming links run
        started(kz)
    else:
        # A SIP worker: nothing started; connect() (child_init) binds the reply queues of
        # every broker, a query reads them all while it waits.
        kz.connect()
    assert kz._pub_link.host.endswith(':%d' % nodes.port(1))   # publishes to the first open
    for n in range(3):
        reply = kz.query(exchange, 'route.req', event('route', 'req', N=n), timeout=5)
        assert reply['Via'] == 'node2'
    assert kz.stats()['replies_unmatched'] == 0


def test_a_killed_standalone_broker_does_not_stop_the_other_and_late_ack_loses_nothing(
        runtimes, nodes):
    exchange, queue = unique('zkill'), unique('zkill-q')
    kz = runtimes(**one_standalone_zone(nodes, workers=2, prefetch=2))
    seen = []

    @kz.event_route('kazoo:consumer-event-k')
    def slow(payload, meta):
        gevent.sleep(0.01)
        seen.append((payload['N'], meta.broker))

    # Durable and named: what node 1 held unacked when it died is there after its restart.
    kz.subscribe(exchange, 'k', queue=queue, durable=True, auto_delete=False,
                 exchange_durable=True)
    started(kz)
    senders = [runtimes(nodes.url(i)) for i in (1, 2)]
    total = 60
    for n in range(total):
        for i, sender in enumerate(senders, 1):
            sender.publish(exchange, 'k', event('k', 'x', N='%d-%d' % (i, n)), persistent=True,
                           confirm=True)
    assert wait_for(lambda: any(n.startswith('1-') for n, _ in seen), 10)
    nodes.kill(1)
    before = len([1 for n, _ in seen if n.startswith('2-')])
    # Node 2's messages keep coming while node 1 is dead.
    assert wait_for(lambda: len({n for n, _ in seen if n.startswith('2-')}) == total, 20)
    assert len([1 for n, _ in seen if n.startswith('2-')]) > before or before == total
    assert not nodes.alive(1)
    nodes.restart(1)
    assert wait_for(lambda: len({n for n, _ in seen}) == 2 * total, 30), \
        sorted(set('%d-%d' % (i, n) for i in (1, 2) for n in range(total))
               - {n for n, _ in seen})[:10]
    for sender in senders:
        sender.stop()
    for i in (1, 2):
        assert wait_for(lambda: nodes.queues(i).get(queue) == (0, 0), 10), nodes.queues(i)
        nodes.ctl(i, 'delete_queue', queue, check=False)


def test_a_zone_entirely_down_does_not_block_the_others(runtimes, nodes):
    exchange = unique('zdown')
    kz = runtimes({'local': [nodes.url(1)], 'dc2': [DEAD_URL]}, connect_timeout=0.5)
    seen = collect(kz, 'kazoo:consumer-event-d')
    kz.subscribe(exchange, 'd', federate=True)
    kz.start()
    assert wait_for(lambda: kz._pub_link.connected and kz._sub_link.connected, 10)
    kz.publish(exchange, 'd', event('d', 'x'))
    assert wait_for(lambda: seen, 5)
    # dc2: buffered (sent when it comes), a query fails at once rather than hang.
    kz.publish(exchange, 'd', event('d', 'y'), zone='dc2')
    assert kz.stats()['buffer_size'] == 1
    with pytest.raises((NotConnected, QueryTimeout)):
        kz.query(exchange, 'd', event('d', 'q'), zone='dc2', timeout=1)
    assert [(link['zone'], link['role'], link['connected']) for link in kz.links()] == [
        ('local', 'publish', True), ('local', 'consume', True),
        ('dc2', 'publish', False), ('dc2', 'consume', False)]
