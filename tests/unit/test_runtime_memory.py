"""The runtime end to end on kombu's memory:// transport (no broker)."""

import random
from time import monotonic

import gevent
import pytest
from kombu import Connection, Exchange, Producer

import kazoo_green
from kazoo_green import BufferFull, InvalidPayload, NotConnected, QueryTimeout, UnknownExchange

from ..conftest import event, unique, wait_for

MEM = 'memory://'


def raw_publish(exchange, routing_key, body):
    """Put an arbitrary body on the memory broker, bypassing kazoo_green's checks."""
    with Connection('memory://localhost/') as conn:
        Producer(conn.channel()).publish(body, exchange=Exchange(exchange, 'topic'),
                                         routing_key=routing_key,
                                         content_type='application/json',
                                         content_encoding='binary', serializer=None)


@pytest.fixture
def consumer(runtimes):
    """A started runtime subscribed to a fresh topic exchange; returns (kz, exchange, seen)."""
    def make(ack='late', workers=4, **sub):
        kz = runtimes(MEM, workers=workers)
        exchange = unique('ex')
        seen = []
        kz.subscribe(exchange, sub.pop('routing_key', '#'), exchange_type='topic', ack=ack,
                     queue=unique('q'), **sub)
        kz.start()
        assert kz.wait_connected(5)
        return kz, exchange, seen
    return make


def test_routes_fall_back_from_most_to_least_specific(consumer):
    kz, exchange, seen = consumer()
    for name in ('kazoo:consumer-event-presence-update', 'kazoo:consumer-event-presence',
                 'kazoo:consumer-event-event-category-event-name',
                 'kazoo:consumer-event-event-category', 'kazoo:consumer-event'):
        kz.add_route(name, lambda p, meta: seen.append((p['n'], meta.route)))
    kz.publish(exchange, 'a', event('presence', 'update', n=1))
    kz.publish(exchange, 'a', event('Presence', 'Probe', n=2))
    assert wait_for(lambda: len(seen) == 2)
    kz.routes.remove('kazoo:consumer-event-presence')
    kz.publish(exchange, 'a', event('presence', 'probe', n=3))
    assert wait_for(lambda: len(seen) == 3)
    kz.routes.remove('kazoo:consumer-event-event-category-event-name')
    kz.publish(exchange, 'a', event('other', 'thing', n=4))
    assert wait_for(lambda: len(seen) == 4)
    kz.routes.remove('kazoo:consumer-event-event-category')
    kz.publish(exchange, 'a', event('other', 'thing', n=5))
    assert wait_for(lambda: len(seen) == 5)
    assert sorted(seen) == [
        (1, 'kazoo:consumer-event-presence-update'),
        (2, 'kazoo:consumer-event-presence'),
        (3, 'kazoo:consumer-event-event-category-event-name'),
        (4, 'kazoo:consumer-event-event-category'),
        (5, 'kazoo:consumer-event'),
    ]


def test_route_registration_is_normalised_and_underscores_map_to_dashes(consumer):
    kz, exchange, seen = consumer()

    @kz.event_route('kazoo:consumer-event-Directory-REG_FLUSH')
    def flush(payload, meta):
        seen.append(meta.route)

    kz.publish(exchange, 'a', event('directory', 'reg_flush'))
    assert wait_for(lambda: seen) == ['kazoo:consumer-event-directory-reg-flush']


def test_binding_event_keys_choose_the_route(consumer):
    kz, exchange, seen = consumer(event_key='Type', event_subkey='Action')
    kz.add_route('kazoo:consumer-event-dialog-update', lambda p, m: seen.append(m.route))
    kz.publish(exchange, 'a', event('ignored', 'ignored', Type='Dialog', Action='update'))
    assert wait_for(lambda: seen) == ['kazoo:consumer-event-dialog-update']


def test_late_ack_acks_after_success_and_rejects_on_error(consumer):
    kz, exchange, seen = consumer(ack='late')

    @kz.event_route('kazoo:consumer-event-t')
    def handler(payload, meta):
        seen.append(payload['n'])
        if payload['n'] % 2:
            raise RuntimeError('odd numbers fail')

    for n in range(10):
        kz.publish(exchange, 'a', event('t', 'x', n=n))
    assert wait_for(lambda: kz.stats()['acked'] + kz.stats()['rejected'] == 10)
    stats = kz.stats()
    assert (stats['acked'], stats['rejected'], stats['handler_errors']) == (5, 5, 5)
    assert sorted(seen) == list(range(10))


def test_early_ack_acks_before_the_handler_runs(consumer):
    kz, exchange, seen = consumer(ack='early')

    @kz.event_route('kazoo:consumer-event-t')
    def handler(payload, meta):
        seen.append(kz.stats()['acked'])  # already acked when we get here
        raise RuntimeError('does not matter: already acked')

    kz.publish(exchange, 'a', event('t', 'x'))
    assert wait_for(lambda: seen) == [1]
    assert wait_for(lambda: kz.stats()['handler_errors'] == 1)
    assert kz.stats()['rejected'] == 0


@pytest.mark.parametrize('ack', ['late', 'early'])
def test_bad_input_is_counted_rejected_and_consuming_goes_on(consumer, ack):
    kz, exchange, seen = consumer(ack=ack)
    kz.add_route('kazoo:consumer-event', lambda p, m: seen.append(p.get('ok')))
    bad = [b'', b'not json', b'[1,2,3]', b'"string"', b'\xff\xfe\x00']
    # Key fields missing or not text: not bad input, routed to the fallbacks (C module).
    keyless = [b'{"no": "keys"}', b'{"Event-Category": {"x": 1}, "Event-Name": "y"}']
    for body in bad + keyless:
        raw_publish(exchange, 'a', body)
    kz.publish(exchange, 'a', event('good', 'one', ok=True))
    assert wait_for(lambda: len(seen) == 3)
    assert seen == [None, None, True]
    stats = kz.stats()
    assert stats['bad_input'] == len(bad)
    assert stats['rejected'] == len(bad)
    assert stats['acked'] == 3


def test_unrouted_messages_are_counted_and_acked(consumer):
    kz, exchange, seen = consumer()
    kz.publish(exchange, 'a', event('nobody', 'listens'))
    assert wait_for(lambda: kz.stats()['unrouted'] == 1)
    assert wait_for(lambda: kz.stats()['acked'] == 1)


def test_failing_handlers_do_not_kill_workers(consumer):
    kz, exchange, seen = consumer(workers=2)

    @kz.event_route('kazoo:consumer-event-t')
    def handler(payload, meta):
        if payload['fail']:
            raise ValueError('boom %d' % payload['n'])
        seen.append(payload['n'])

    for n in range(20):
        kz.publish(exchange, 'a', event('t', 'x', n=n, fail=True))
    kz.publish(exchange, 'a', event('t', 'x', n=99, fail=False))
    assert wait_for(lambda: seen) == [99]
    assert kz.stats()['handler_errors'] == 20
    assert all(not lane.greenlet.dead for lane in kz.dispatcher.lanes)


def test_handlers_see_payload_envelope_and_metadata(consumer):
    kz, exchange, seen = consumer(routing_key='update.*')
    kz.add_route('kazoo:consumer-event-t', lambda p, m: seen.append((p, m)))
    msg_id = kz.publish(exchange, 'update.alice', event('t', 'x'), headers={'h': 'v'})
    payload, meta = wait_for(lambda: seen)[0]
    assert payload['Msg-ID'] == msg_id
    assert payload['App-Name'] == 'kgtest'
    assert payload['App-Version'] == kazoo_green.__version__
    assert payload['Node'] == kz.node
    assert (meta.exchange, meta.routing_key, meta.headers, meta.redelivered) == \
        (exchange, 'update.alice', {'h': 'v'}, False)
    assert meta.route == 'kazoo:consumer-event-t'


def test_consistent_worker_keeps_order_per_key(consumer):
    kz, exchange, seen = consumer(workers=4, worker_key='Call-ID')
    running = set()
    overlaps = []

    @kz.event_route('kazoo:consumer-event-t')
    def handler(payload, meta):
        key = payload['Call-ID']
        if key in running:
            overlaps.append(key)
        running.add(key)
        gevent.sleep(random.random() * 0.003)
        seen.append((key, payload['n']))
        running.discard(key)

    for n in range(30):
        for key in ('a', 'b', 'c'):
            kz.publish(exchange, 'x', event('t', 'x', n=n, **{'Call-ID': key}))
    assert wait_for(lambda: len(seen) == 90)
    assert overlaps == []
    for key in ('a', 'b', 'c'):
        assert [n for k, n in seen if k == key] == list(range(30))


def test_query_answered_by_in_process_responder(runtimes):
    responder = runtimes(MEM, app_name='responder')
    exchange = unique('callmgr')

    @responder.event_route('kazoo:consumer-event-route-req')
    def answer(request, meta):
        responder.respond(request, {'Route': 'sip:%s@127.0.0.1' % request['To']}, meta)

    responder.subscribe(exchange, 'route.req', exchange_type='topic', queue=unique('q'))
    responder.start()
    assert responder.wait_connected(5)

    caller = runtimes(MEM)  # not started: the calling greenlet reads itself
    reply = caller.query(exchange, 'route.req', event('route', 'req', To='alice'))
    assert reply['Route'] == 'sip:alice@127.0.0.1'

    # Many greenlets at once, each must get its own answer.
    users = ['u%d' % i for i in range(30)]
    jobs = [gevent.spawn(caller.query, exchange, 'route.req', event('route', 'req', To=u))
            for u in users]
    gevent.joinall(jobs, timeout=20, raise_error=True)
    assert [j.value['Route'] for j in jobs] == ['sip:%s@127.0.0.1' % u for u in users]
    assert caller.stats()['queries_ok'] == 31
    assert caller.stats()['pending_queries'] == 0


def silent_responder(runtimes):
    """An exchange whose queries are consumed and never answered."""
    silent = runtimes(MEM)
    exchange = unique('callmgr')
    silent.add_route('kazoo:consumer-event', lambda p, m: None)
    silent.subscribe(exchange, '#', exchange_type='topic', queue=unique('q'))
    silent.start()
    assert silent.wait_connected(5)
    return exchange


def test_query_timeout_is_a_real_deadline(runtimes):
    exchange = silent_responder(runtimes)
    caller = runtimes(MEM)
    started = monotonic()
    with pytest.raises(QueryTimeout):
        caller.query(exchange, 'route.req', event('route', 'req'), timeout=0.3)
    assert monotonic() - started >= 0.3   # not before its deadline
    assert caller.stats()['queries_timeout'] == 1


def test_timeout_zero_means_no_time_not_the_default(runtimes):
    exchange = silent_responder(runtimes)
    caller = runtimes(MEM, query_timeout=60)
    caller.publish(exchange, 'x', event('a', 'b'))   # connected: no connect within "0 s"
    with gevent.Timeout(30, AssertionError('timeout=0 waited (for the 60 s default?)')):
        with pytest.raises(QueryTimeout, match='within 0.000s'):
            caller.query(exchange, 'route.req', event('route', 'req'), timeout=0)
    for call in (lambda: caller.query(exchange, 'r', event('a', 'b'), timeout=-1),
                 lambda: caller.publish(exchange, 'r', event('a', 'b'), timeout=-0.5)):
        with pytest.raises(ValueError, match='negative'):
            call()


def test_invalid_payload_raises_and_sends_nothing(consumer):
    kz, exchange, seen = consumer()
    kz.add_route('kazoo:consumer-event-a', lambda p, m: seen.append(p))
    for bad in ('{not json', '[1]', 17):
        with pytest.raises(InvalidPayload):
            kz.publish(exchange, 'a', bad)
    kz.publish(exchange, 'a', '{"Event-Category": "a", "Event-Name": "b"}')
    assert wait_for(lambda: seen)
    gevent.sleep(0.05)
    assert len(seen) == 1
    assert kz.stats()['published'] == 1


def test_unknown_exchange_raises(runtimes):
    kz = runtimes(MEM)
    with pytest.raises(UnknownExchange):
        kz.publish(unique('missing'), 'a', event('a', 'b'))
    with pytest.raises(UnknownExchange):
        kz.query(unique('missing'), 'a', event('a', 'b'))


def test_unreachable_broker_buffers_then_refuses(runtimes):
    kz = runtimes('amqp://guest:guest@127.0.0.1:1//', publish_buffer=3, connect_timeout=0.5)
    for n in range(3):
        kz.publish('anything', 'a', event('a', 'b', n=n))
    with pytest.raises(BufferFull):
        kz.publish('anything', 'a', event('a', 'b', n=3))
    stats = kz.stats()
    assert (stats['buffered'], stats['buffer_size'], stats['publish_errors']) == (3, 3, 1)
    with pytest.raises(NotConnected) as failed:
        kz.query('anything', 'a', event('a', 'b'), timeout=30)
    assert 'timed out' not in str(failed.value)   # refused at once, not waited for


def test_connection_open_event_and_graceful_stop(runtimes):
    kz = runtimes(MEM, workers=2)
    exchange = unique('ex')
    opened, done = [], []
    kz.add_route('kazoo:consumer-event-connection-open',
                 lambda p, m: opened.append(p['Link']))

    @kz.event_route('kazoo:consumer-event-slow')
    def slow(payload, meta):
        gevent.sleep(0.3)
        done.append(payload['n'])

    kz.subscribe(exchange, '#', exchange_type='topic', queue=unique('q'))
    kz.start()
    assert wait_for(lambda: sorted(opened) == ['consume', 'publish'])
    for n in range(2):
        kz.publish(exchange, 'a', event('slow', 'x', n=n))
    assert wait_for(lambda: kz.stats()['consumed'] == 2)
    kz.stop()
    assert sorted(done) == [0, 1]  # in-flight handlers finished before stop returned
    assert kz.stats()['acked'] == 2


def test_stats_has_every_counter():
    kz = kazoo_green.Kazoo(MEM)
    stats = kz.stats()
    for name in ('published', 'confirmed', 'returned', 'queries_ok', 'queries_timeout',
                 'consumed', 'acked', 'rejected', 'handler_errors', 'reconnects',
                 'bad_input'):
        assert stats[name] == 0


def test_brokers_string_and_list():
    a = kazoo_green.Kazoo('amqp://a//;amqp://b// ; amqp://c//')
    b = kazoo_green.Kazoo(['amqp://a//', 'amqp://b//', 'amqp://c//'])
    assert a.urls == b.urls == ['amqp://a//', 'amqp://b//', 'amqp://c//']
    with pytest.raises(ValueError):
        kazoo_green.Kazoo(' ; ')
