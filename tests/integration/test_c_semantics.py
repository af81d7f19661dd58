"""The C kazoo module's semantics kazoo_green copies, on the real broker (127.0.0.1:5672):
routes for messages without key fields, unsolicited messages on the reply queue run as
events, exchange flags and exchange-to-exchange bindings."""

import gevent
import pytest

from kazoo_green import QueryTimeout

from ..conftest import RABBIT_URL, rabbitmqctl, unique, wait_for


def started(kz):
    kz.start()
    assert kz.wait_connected(10)
    return kz


def test_messages_without_key_fields_take_the_c_modules_fallback_routes(runtimes):
    exchange = unique('csem')
    kz = runtimes(RABBIT_URL)
    seen = []
    for route in ('kazoo:consumer-event-cat', 'kazoo:consumer-event-event-category-event-name',
                  'kazoo:consumer-event-cat-name'):
        # (connection events take these routes too: kazoo:consumer-event-connection-open
        # and -connection are not defined)
        kz.add_route(route, lambda payload, meta: seen.append((payload['n'], meta.route))
                     if 'n' in payload else None)
    kz.subscribe(exchange, 'k')
    started(kz)
    sender = runtimes(RABBIT_URL)
    for n, payload in enumerate([{'t': 3}, {'Event-Name': 'name'}, {'Event-Category': 'cat'},
                                 {'Event-Category': 'cat', 'Event-Name': 'name'},
                                 {'Event-Category': 'other', 'Event-Name': 'x'}]):
        payload['n'] = n
        sender.publish(exchange, 'k', payload)
    assert wait_for(lambda: len(seen) == 5), seen
    assert sorted(seen) == [
        (0, 'kazoo:consumer-event-event-category-event-name'),
        (1, 'kazoo:consumer-event-event-category-event-name'),
        (2, 'kazoo:consumer-event-cat'),
        (3, 'kazoo:consumer-event-cat-name'),
        (4, 'kazoo:consumer-event-event-category-event-name')]
    assert kz.stats()['bad_input'] == 0


@pytest.mark.parametrize('direct_reply_to', [True, False], ids=['reply-to', 'server-id'])
def test_unsolicited_messages_on_the_reply_queue_run_as_events(runtimes, direct_reply_to):
    kz = runtimes(RABBIT_URL, direct_reply_to=direct_reply_to)
    seen = []
    kz.add_route('kazoo:consumer-event-presence-probe',
                 lambda payload, meta: seen.append((payload, meta)))
    started(kz)
    assert wait_for(lambda: kz._pub_link.connected)
    sender = runtimes(RABBIT_URL)
    sender.publish('targeted', kz.server_id, {'Event-Category': 'presence',
                                              'Event-Name': 'probe', 'Username': 'alice'})
    assert wait_for(lambda: seen)
    payload, meta = seen[0]
    assert (payload['Username'], payload['AMQP-Broker-Zone'], meta.exchange,
            meta.routing_key) == ('alice', 'local', 'targeted', kz.server_id)
    assert isinstance(payload['AMQP-Received'], int)
    assert kz.stats()['unsolicited'] == 1


def test_a_late_reply_is_not_taken_for_an_unsolicited_message(runtimes):
    exchange = unique('clate')
    responder = runtimes(RABBIT_URL)
    held = []
    responder.add_route('kazoo:consumer-event-route-req',
                        lambda payload, meta: held.append((payload, meta)))
    responder.subscribe(exchange, 'req')
    started(responder)
    kz = runtimes(RABBIT_URL)
    events = []
    kz.add_route('kazoo:consumer-event', lambda payload, meta: events.append(payload)
                 if payload['Event-Category'] != 'connection' else None)
    started(kz)
    with pytest.raises(QueryTimeout):
        kz.query(exchange, 'req', {'Event-Category': 'route', 'Event-Name': 'req'},
                 timeout=0.3)
    request, meta = held[0]
    responder.respond(request, {'Event-Category': 'route', 'Event-Name': 'resp'}, meta)
    # Counted unmatched in the reading greenlet instead of being handed to a worker: no
    # event can follow.
    assert wait_for(lambda: kz.stats()['replies_unmatched'] == 1)
    assert events == [] and kz.stats()['unsolicited'] == 0


def _exchange_flags(name):
    out = rabbitmqctl('list_exchanges', 'name', 'type', 'auto_delete', 'internal')
    for line in out.splitlines():
        parts = line.split('\t')
        if parts[0] == name:
            return tuple(parts[1:])
    return None


def test_exchange_flags_and_exchange_to_exchange_bindings(runtimes):
    dest, source, other = unique('cdest'), unique('csrc'), unique('csrc2')
    kz = runtimes(RABBIT_URL)
    seen = []
    kz.add_route('kazoo:consumer-event-e2e', lambda payload, meta: seen.append(payload['n']))
    # The C module's exchange-bindings object (source -> destination), and two sources:
    # the C module applies only the first one that has a routing key; both apply here.
    kz.subscribe(dest, '#', exchange_type='topic', exchange_internal=True,
                 exchange_auto_delete=True,
                 exchange_bindings={source: {'type': 'topic', 'routing': ['a.*', 'b.#']},
                                    other: {'type': 'direct', 'routing': 'x'}})
    started(kz)
    assert _exchange_flags(dest) == ('topic', 'true', 'true')
    assert _exchange_flags(source) == ('topic', 'false', 'false')
    sender = runtimes(RABBIT_URL)
    sender.publish(source, 'a.one', {'Event-Category': 'e2e', 'Event-Name': 'x', 'n': 1})
    sender.publish(source, 'b.two.three', {'Event-Category': 'e2e', 'Event-Name': 'x', 'n': 2})
    sender.publish(source, 'c.not', {'Event-Category': 'e2e', 'Event-Name': 'x', 'n': 3})
    sender.publish(other, 'x', {'Event-Category': 'e2e', 'Event-Name': 'x', 'n': 4})
    # One sender channel, one queue: 3 (unroutable) would have come before 4.
    assert wait_for(lambda: 4 in seen)
    assert sorted(seen) == [1, 2, 4]
    kz.stop()
    # auto_delete: gone once its last binding (the queue's) went with the consumer.
    assert wait_for(lambda: _exchange_flags(dest) is None, 10)
    for name in (source, other):
        rabbitmqctl('eval', 'rabbit_exchange:delete(rabbit_misc:r(<<"/">>, exchange, '
                    '<<"%s">>), false, <<"test">>).' % name, check=False)


def test_publishes_say_where_an_answer_would_reach_this_process(runtimes):
    """The C module adds Server-ID to every message it publishes (when absent): a Kazoo
    application may answer an event there; kazoo_green then runs the answer as an event."""
    exchange = unique('csid')
    kz = runtimes(RABBIT_URL)
    answers = []
    kz.add_route('kazoo:consumer-event-presence-answer',
                 lambda payload, meta: answers.append(payload))
    started(kz)
    peer = runtimes(RABBIT_URL)
    got = []
    peer.add_route('kazoo:consumer-event-presence-search',
                   lambda payload, meta: got.append(payload))
    peer.subscribe(exchange, 'search')
    started(peer)
    kz.publish(exchange, 'search', {'Event-Category': 'presence', 'Event-Name': 'search'})
    kz.publish(exchange, 'search', {'Event-Category': 'presence', 'Event-Name': 'search',
                                    'Server-ID': 'kept'})
    assert wait_for(lambda: len(got) == 2)
    assert [p['Server-ID'] for p in got] == [kz.server_id, 'kept']
    peer.publish('targeted', got[0]['Server-ID'], {'Event-Category': 'presence',
                                                   'Event-Name': 'answer'})
    assert wait_for(lambda: answers)


def test_respond_understands_the_c_modules_consumer_server_id(runtimes):
    """A request forwarded by the C module carries Server-ID consumer://<server>/<id>."""
    exchange = unique('ccons')
    responder = runtimes(RABBIT_URL)

    @responder.event_route('kazoo:consumer-event-route-req')
    def answer(payload, meta):
        payload['Server-ID'] = 'consumer://7/' + payload['Server-ID']
        responder.respond(payload, {'Event-Category': 'route', 'Event-Name': 'resp'})

    responder.subscribe(exchange, 'req')
    started(responder)
    kz = runtimes(RABBIT_URL, direct_reply_to=False)
    reply = kz.query(exchange, 'req', {'Event-Category': 'route', 'Event-Name': 'req'},
                     timeout=5)
    # Stamped as consumed messages are (the C module's $kzR is too).
    assert (reply['Event-Name'], reply['AMQP-Broker-Zone']) == ('resp', 'local')
    assert isinstance(reply['AMQP-Received'], int)


def test_a_missing_worker_key_falls_back_to_the_routing_key(runtimes):
    exchange = unique('cwk')
    kz = runtimes(RABBIT_URL, workers=4)
    lanes = []

    @kz.event_route('kazoo:consumer-event-w')
    def busy(payload, meta):
        lanes.append((meta.routing_key, gevent.getcurrent().name))
        gevent.sleep(0.002)   # busy: without a key the next message takes another worker

    kz.subscribe(exchange, ['r.1', 'r.2', 'r.3'], exchange_type='topic', worker_key='From')
    started(kz)
    for n in range(30):
        kz.publish(exchange, 'r.%d' % (n % 3 + 1), {'Event-Category': 'w', 'Event-Name': 'x'})
    assert wait_for(lambda: len(lanes) == 30)
    # No From: each routing key's messages on one worker, as the C module's
    # consistent-worker-key falls back to the routing key.
    by_key = {}
    for key, worker in lanes:
        by_key.setdefault(key, set()).add(worker)
    assert all(len(workers) == 1 for workers in by_key.values()), by_key


def test_runtime_wide_key_fields_as_amqp_consumer_event_key(runtimes):
    exchange = unique('ckey')
    kz = runtimes(RABBIT_URL, event_key='Type', event_subkey='Sub')
    seen = []
    kz.add_route('kazoo:consumer-event-presence-upd',
                 lambda payload, meta: seen.append(payload['n']))
    kz.add_route('kazoo:consumer-event-connection-open',
                 lambda payload, meta: seen.append(payload['Type']))
    kz.subscribe(exchange, 'k')
    started(kz)
    kz.publish(exchange, 'k', {'Type': 'presence', 'Sub': 'upd', 'n': 1})
    assert wait_for(lambda: 1 in seen and 'connection' in seen)
