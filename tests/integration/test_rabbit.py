"""Every public operation against the real RabbitMQ on 127.0.0.1:5672."""

import os
import signal
import subprocess
import sys
import textwrap
from time import monotonic

import gevent
import pytest

from kazoo_green import (
    ConnectionLost, KazooError, QueryFailed, QueryTimeout, UnknownExchange, Unroutable,
)

from ..conftest import (
    RABBIT_URL, close_connections, event, queue_counts, rabbitmqctl, unique, wait_for,
)
from . import responders
from .responders import PlainResponder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Cleanup(tuple):
    """(queues, exchanges): names to delete after the test; ``queue(prefix)`` and
    ``exchange(prefix)`` make a unique name and list it."""

    def __new__(cls):
        return tuple.__new__(cls, ([], []))

    def queue(self, prefix):
        self[0].append(unique(prefix))
        return self[0][-1]

    def exchange(self, prefix):
        self[1].append(unique(prefix))
        return self[1][-1]


@pytest.fixture
def cleanup():
    """Names of queues/exchanges to delete after the test (a Cleanup)."""
    queues, exchanges = names = Cleanup()
    yield names
    for q in queues:
        rabbitmqctl('delete_queue', q, check=False)
    for e in exchanges:
        rabbitmqctl('eval', '%s' % _delete_exchange_eval(e), check=False)


def _delete_exchange_eval(name):
    return ('rabbit_exchange:delete(rabbit_misc:r(<<"/">>, exchange, <<"%s">>), false, '
            '<<"tests">>).' % name)


@pytest.fixture
def responder():
    made = []

    def make(exchange, routing_key='route.req', style='kazoo', delay=0.0):
        r = PlainResponder(exchange, routing_key, style, delay)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# -- publish ---------------------------------------------------------------

def test_publish_plain_confirmed_persistent(runtimes):
    consumer = runtimes(RABBIT_URL)
    exchange, seen = unique('ex'), []
    consumer.add_route('kazoo:consumer-event-a', lambda p, m: seen.append((p, m)))
    consumer.subscribe(exchange, 'k.#', exchange_type='topic')
    consumer.start()
    assert consumer.wait_connected(5)

    kz = runtimes(RABBIT_URL)
    kz.publish(exchange, 'k.1', event('a', 'b', n=1))
    kz.publish(exchange, 'k.2', '{"Event-Category": "a", "Event-Name": "b", "n": 2}',
               confirm=True, persistent=True)
    assert wait_for(lambda: len(seen) == 2)
    by_n = {p['n']: m for p, m in seen}
    assert by_n[2].properties.get('delivery_mode') == 2
    assert kz.stats()['confirmed'] == 1
    assert kz.stats()['published'] == 2


def test_mandatory_publish_is_returned_and_counted(runtimes):
    kz = runtimes(RABBIT_URL)
    kz.publish('amq.topic', unique('nobody'), event('a', 'b'), mandatory=True, confirm=True)
    assert wait_for(lambda: kz.stats()['returned'] == 1, timeout=5)


def test_unknown_exchange_fails_that_call_only(runtimes, responder):
    exchange = unique('callmgr')
    responder(exchange, delay=0.3)
    kz = runtimes(RABBIT_URL)
    kz.start()
    jobs = [gevent.spawn(kz.query, exchange, 'route.req', event('route', 'req', To='u%d' % i))
            for i in range(20)]
    gevent.sleep(0.1)  # all 20 are in flight now
    for call in (kz.publish, kz.query):
        with pytest.raises(UnknownExchange):
            call(unique('missing'), 'x', event('a', 'b'))
    with pytest.raises(UnknownExchange):
        kz.publish(unique('missing'), 'x', event('a', 'b'), confirm=True)
    gevent.joinall(jobs, timeout=10, raise_error=True)
    assert [j.value['Answer'] for j in jobs] == ['u%d' % i for i in range(20)]
    assert kz.query(exchange, 'route.req', event('route', 'req', To='after'))['Answer'] == 'after'


# -- query -----------------------------------------------------------------

@pytest.mark.parametrize('style', ['kazoo', 'generic'])
@pytest.mark.parametrize('started', [False, True], ids=['caller-driven', 'background'])
def test_query_both_reply_styles(runtimes, responder, style, started):
    exchange = unique('callmgr')
    r = responder(exchange, style=style)
    kz = runtimes(RABBIT_URL)
    if started:
        kz.start()
    reply = kz.query(exchange, 'route.req', event('route', 'req', To='alice'))
    # Stamped as the C module stamps $kzR: the zone it came through, when.
    assert reply.pop('AMQP-Broker-Zone') == 'local'
    assert isinstance(reply.pop('AMQP-Received'), int)
    assert reply == {'Answer': 'alice', 'Style': style, **(
        {'Msg-ID': r.requests[0][0]['Msg-ID']} if style == 'kazoo' else {})}
    request, props = r.requests[0]
    # Both styles are always offered.
    assert request['Server-ID'] == kz.server_id
    assert props['reply_to'].startswith('amq.rabbitmq.reply-to.')  # the broker expands it
    assert props['correlation_id'] == request['Msg-ID']
    for field in ('App-Name', 'App-Version', 'Node', 'Msg-ID'):
        assert field in request

    jobs = [gevent.spawn(kz.query, exchange, 'route.req', event('route', 'req', To='u%d' % i))
            for i in range(50)]
    gevent.joinall(jobs, timeout=20, raise_error=True)
    assert [j.value['Answer'] for j in jobs] == ['u%d' % i for i in range(50)]
    stats = kz.stats()
    assert stats['queries_ok'] == 51 and stats['pending_queries'] == 0


@pytest.fixture
def process_responder():
    """PlainResponder in a process of its own: a blocking caller stops every greenlet of
    this one while it waits."""
    made = []

    def make(exchange, style='kazoo', delay=0.0):
        made.append(responders.spawn(exchange, style, delay))
        return made[-1]

    yield make
    for proc in made:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize('style', ['kazoo', 'generic'])
def test_blocking_caller_queries_write_and_read_in_one_pass(runtimes, process_responder,
                                                           style):
    """blocking=True (Kamailio's SIP workers): replies (matched by the body's Msg-ID or,
    without one, by correlation_id), headers, timeouts, returns and a connection closed
    by the broker between two calls, all through the lane (FastPath.ask)."""
    exchange = unique('callmgr')
    process_responder(exchange, style)
    kz = runtimes(RABBIT_URL, blocking=True, query_timeout=1.0)
    for i in range(199):
        reply = kz.query(exchange, 'route.req', event('route', 'req', To='u%d' % i))
        assert reply['Answer'] == 'u%d' % i and reply['Style'] == style
    reply = kz.query(exchange, 'route.req', event('route', 'req', To='h'),
                     headers={'X-Trace': 'abc', 'N': 7})
    assert reply['Headers'] == {'X-Trace': 'abc', 'N': 7}
    with pytest.raises(Unroutable):
        kz.query(exchange, 'nobody.listens', event('route', 'req'))
    with pytest.raises(QueryTimeout):
        kz.query('amq.topic', 'route.req', event('route', 'req'), timeout=0.3,
                 mandatory=False)
    assert close_connections(kz.node) >= 1
    # the broker's close is on the socket before the next call
    assert wait_for(lambda: kz._pub_link.fast.has_pending(), timeout=10)
    assert kz.query(exchange, 'route.req', event('route', 'req', To='z'))['Answer'] == 'z'
    stats = kz.stats()
    assert stats['queries_ok'] == 201 and stats['pending_queries'] == 0
    assert stats['published'] == 203 and stats['reconnects'] == 1


def test_blocking_runtime_that_queried_before_start_reads_in_the_background_after_it(
        runtimes, process_responder):
    """A kemi.Kazoo (blocking) that queried before start(): its caller-made connection has
    no heartbeats and a FastPath that waits in poll(2), where a background reader would
    starve every other greenlet. start() makes the connection again for background use."""
    exchange = unique('callmgr')
    process_responder(exchange, 'kazoo')
    kz = runtimes(RABBIT_URL, blocking=True, heartbeat=4)
    assert kz.query(exchange, 'route.req', event('route', 'req', To='a'))['Answer'] == 'a'
    assert kz._pub_link.fast.blocking and kz._pub_link._raw.heartbeat == 0
    kz.start()
    assert kz.wait_connected(10)
    link = kz._pub_link
    assert not link.fast.blocking, 'the background reader waits in poll(2)'
    assert link._raw.heartbeat == 4, 'the background connection has no heartbeats'
    ran = gevent.spawn(lambda: 'ran')
    assert ran.get(timeout=5) == 'ran'   # other greenlets run while the reader waits
    assert kz.query(exchange, 'route.req', event('route', 'req', To='b'))['Answer'] == 'b'
    stats = kz.stats()
    assert stats['connection_errors'] == 0 and stats['connects'] == 2


def test_blocking_caller_takes_the_general_path_while_a_lock_is_held(runtimes,
                                                                      process_responder):
    """The lane takes no lock, so it must not run while a greenlet holds one (it waits
    somewhere with frames half written or read): the query then publishes and waits."""
    exchange = unique('callmgr')
    process_responder(exchange)
    kz = runtimes(RABBIT_URL, blocking=True, query_timeout=2.0)
    assert kz.query(exchange, 'route.req', event('route', 'req', To='a'))['Answer'] == 'a'
    link = kz._pub_link
    assert link.lane() is link.fast is not None
    for lock in (link._wlock, link._rlock):
        with lock:
            assert link.lane() is None
            assert kz.query(exchange, 'route.req', event('route', 'req', To='b'))['Answer'] == 'b'
    assert link.lane() is link.fast
    assert kz.stats()['queries_ok'] == 3


def test_blocking_caller_late_and_bad_replies(runtimes, process_responder):
    """In the lane: a reply that comes after its query timed out is counted and skipped
    by the next query; a reply that is not JSON fails its query with QueryFailed."""
    slow = unique('callmgr')
    process_responder(slow, 'kazoo', delay=0.4)
    kz = runtimes(RABBIT_URL, blocking=True, query_timeout=2.0)
    with pytest.raises(QueryTimeout):
        kz.query(slow, 'route.req', event('route', 'req', To='late'), timeout=0.1)
    gevent.sleep(0.5)   # the late reply is on the socket before the next query's
    assert kz.query(slow, 'route.req', event('route', 'req', To='next'))['Answer'] == 'next'
    assert kz.stats()['replies_unmatched'] == 1
    bad = unique('callmgr')
    process_responder(bad, 'bad')
    with pytest.raises(QueryFailed):
        kz.query(bad, 'route.req', event('route', 'req', To='x'))
    stats = kz.stats()
    assert stats['bad_input'] == 1 and stats['queries_failed'] == 1
    assert stats['queries_ok'] == 1 and stats['queries_timeout'] == 1
    assert stats['pending_queries'] == 0 and stats['connection_errors'] == 0


def test_one_reply_queue_per_process(runtimes, responder):
    exchange = unique('callmgr')
    responder(exchange)
    kz = runtimes(RABBIT_URL)
    for i in range(5):
        kz.query(exchange, 'route.req', event('route', 'req', To='x'))
    out = rabbitmqctl('list_queues', 'name')
    assert sum(1 for line in out.splitlines() if kz.node in line) == 1


def test_targeted_exchange_is_declared_as_the_c_module_declares_it(runtimes):
    """Where ``targeted`` does not exist yet, kazoo_green declares it direct, neither
    durable nor auto-delete: the C kazoo module declares it so, and a RabbitMQ
    exchange declared with other flags would make the C module's declaration fail."""
    import amqp
    vhost = unique('kgvhost')
    rabbitmqctl('add_vhost', vhost)
    try:
        rabbitmqctl('set_permissions', '-p', vhost, 'guest', '.*', '.*', '.*')
        kz = runtimes('amqp://guest:guest@127.0.0.1:5672/' + vhost)
        with pytest.raises(Unroutable):       # connects, declares, then finds no responder
            kz.query('amq.direct', 'nobody', event('route', 'req'))
        conn = amqp.Connection('127.0.0.1:5672', userid='guest', password='guest',
                               virtual_host=vhost)
        conn.connect()
        try:
            conn.channel().exchange_declare('targeted', 'direct', durable=False,
                                            auto_delete=False)  # PreconditionFailed if not
        finally:
            conn.close()
    finally:
        rabbitmqctl('delete_vhost', vhost, check=False)


def test_query_timeout_and_late_reply_is_counted(runtimes, responder):
    exchange = unique('callmgr')
    slow = responder(exchange, delay=0.6)
    fast = responder(exchange, routing_key='route.fast')
    kz = runtimes(RABBIT_URL)
    with pytest.raises(QueryTimeout):
        kz.query(exchange, 'route.req', event('route', 'req', To='slow'), timeout=0.3)
    assert kz.stats()['queries_timeout'] == 1
    # The late reply is in the reply queue before the next query's: it is read (and
    # counted, not mistaken for that query's reply) on the way to it.
    assert wait_for(lambda: slow.answered == 1, timeout=5)
    assert kz.query(exchange, 'route.fast', event('route', 'req', To='f'))['Answer'] == 'f'
    assert fast.answered == 1
    assert kz.stats()['replies_unmatched'] == 1


def test_unroutable_query_fails_fast(runtimes):
    kz = runtimes(RABBIT_URL)
    with pytest.raises(Unroutable):   # the broker's return, long before the timeout
        kz.query('amq.topic', unique('nobody'), event('a', 'b'), timeout=60)


# -- consume ---------------------------------------------------------------

def test_dead_letters_for_handler_errors_and_bad_input(runtimes, cleanup):
    queues, exchanges = cleanup
    exchange, dlx, dlq = unique('ex'), unique('dlx'), unique('dlq')
    queues.append(dlq)
    exchanges.extend([exchange, dlx])
    holder = runtimes(RABBIT_URL)  # declares the dead-letter exchange and queue
    holder.subscribe(dlx, '#', queue=dlq, exchange_type='fanout', auto_delete=False)
    holder._subscriber.add  # (not started: the DLQ just holds messages)
    kz = runtimes(RABBIT_URL)
    seen = []

    @kz.event_route('kazoo:consumer-event-t')
    def handler(payload, meta):
        seen.append(payload['n'])
        if payload['n'] == 1:
            raise RuntimeError('fail on purpose')

    kz.subscribe(exchange, '#', exchange_type='topic',
                 queue_arguments={'x-dead-letter-exchange': dlx})
    holder.start()
    kz.start()
    assert holder.wait_connected(5) and kz.wait_connected(5)
    holder.stop()  # its queue stays (auto_delete=False), nobody consumes it
    kz.publish(exchange, 'a', event('t', 'x', n=1))
    kz.publish(exchange, 'a', event('t', 'x', n=2))
    _raw_publish(exchange, 'a', b'this is not json')
    assert wait_for(lambda: kz.stats()['acked'] + kz.stats()['rejected'] == 3)
    assert wait_for(lambda: (queue_counts(dlq) or (0, 0))[0] == 2)
    stats = kz.stats()
    assert (stats['acked'], stats['rejected'], stats['bad_input'], stats['handler_errors']) \
        == (1, 2, 1, 1)


def _raw_publish(exchange, routing_key, body):
    from kombu import Connection
    import amqp
    with Connection(RABBIT_URL) as conn:
        conn.channel().basic_publish(amqp.Message(body), exchange=exchange,
                                     routing_key=routing_key)


def test_quorum_queue_subscription(runtimes, cleanup):
    queue = cleanup.queue('quorum')
    kz = runtimes(RABBIT_URL)
    seen = []
    kz.add_route('kazoo:consumer-event-a', lambda p, m: seen.append(p['n']))
    exchange = cleanup.exchange('ex')
    kz.subscribe(exchange, 'q.*', queue=queue, exchange_type='topic', durable=True,
                 auto_delete=False, queue_arguments={'x-queue-type': 'quorum'})
    kz.start()
    assert kz.wait_connected(10)
    for n in range(5):
        kz.publish(exchange, 'q.x', event('a', 'b', n=n), confirm=True)
    assert wait_for(lambda: sorted(seen) == list(range(5)))
    assert 'quorum' in rabbitmqctl('list_queues', 'name', 'type')


def test_prefetch_bounds_messages_in_flight(runtimes):
    kz = runtimes(RABBIT_URL, workers=8)
    exchange = unique('ex')
    running, peak, done = [0], [0], []

    @kz.event_route('kazoo:consumer-event-t')
    def slow(payload, meta):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        gevent.sleep(0.1)
        running[0] -= 1
        done.append(1)

    kz.subscribe(exchange, '#', exchange_type='topic', prefetch=3)
    kz.start()
    assert kz.wait_connected(5)
    for n in range(12):
        kz.publish(exchange, 'a', event('t', 'x', n=n))
    assert wait_for(lambda: len(done) == 12)
    assert peak[0] == 3


def test_subscription_the_broker_refuses_is_retried_until_it_works(runtimes, cleanup):
    """A setup the broker refuses at connect (here: a passive queue that does not exist
    yet; after a node died: its queue not yet cleaned up) is retried with back-off, not
    given up until the next reconnect."""
    import amqp
    queue = cleanup.queue('kgt-later')
    kz = runtimes(RABBIT_URL)
    got = []
    kz.add_route('kazoo:consumer-event-later-x', lambda payload, meta: got.append(payload['n']))
    kz.subscribe('', queue, queue=queue, passive=True, auto_delete=False)
    kz.start()
    assert wait_for(lambda: kz.stats()['setup_errors'] >= 2, timeout=10)  # tried again
    conn = amqp.Connection('127.0.0.1:5672', userid='guest', password='guest')
    conn.connect()
    try:
        conn.channel().queue_declare(queue, auto_delete=False)
    finally:
        conn.close()
    kz.publish('', queue, event('later', 'x', n=1))
    assert wait_for(lambda: got == [1], timeout=15), kz.stats()
    assert kz.stats()['reconnects'] == 0


def test_subscribe_after_start_and_type_mismatch_is_a_clear_error(runtimes, cleanup):
    kz = runtimes(RABBIT_URL)
    kz.start()
    exchange = unique('ex')
    cleanup[1].append(exchange)
    seen = []
    kz.add_route('kazoo:consumer-event-a', lambda p, m: seen.append(p))
    kz.subscribe(exchange, 'a', exchange_type='topic')
    assert kz.wait_connected(5)
    kz.publish(exchange, 'a', event('a', 'b'))
    assert wait_for(lambda: seen)
    with pytest.raises(KazooError) as info:
        kz.subscribe(exchange, 'a', exchange_type='fanout')  # exists as topic
    assert 'PRECONDITION_FAILED' in str(info.value)
    kz.publish(exchange, 'a', event('a', 'b'))  # the runtime still works
    assert wait_for(lambda: len(seen) == 2)


def test_late_ack_message_redelivered_after_handler_process_dies(runtimes, cleanup, tmp_path):
    queues, exchanges = cleanup
    exchange, queue = unique('ex'), unique('q')
    queues.append(queue)
    exchanges.append(exchange)
    script = tmp_path / 'dying.py'
    script.write_text(textwrap.dedent('''
        import os, signal, sys
        import kazoo_green
        kz = kazoo_green.Kazoo(%r)
        @kz.event_route('kazoo:consumer-event-a')
        def die(payload, meta):
            print('handling', payload['n'], flush=True)
            os.kill(os.getpid(), signal.SIGKILL)   # the process dies mid-handler
        kz.subscribe(%r, '#', queue=%r, exchange_type='topic', ack=sys.argv[1],
                     auto_delete=False)
        kz.run()
    ''' % (RABBIT_URL, exchange, queue)))
    publisher = runtimes(RABBIT_URL)

    def run_dying(ack, n):
        proc = subprocess.Popen([sys.executable, str(script), ack], stdout=subprocess.PIPE,
                                text=True)
        assert wait_for(lambda: queue_counts(queue) is not None, timeout=15)
        publisher.publish(exchange, 'x', event('a', 'b', n=n), confirm=True)
        proc.wait(timeout=15)
        assert proc.returncode == -signal.SIGKILL
        assert 'handling %d' % n in proc.stdout.read()

    run_dying('late', 1)
    assert wait_for(lambda: queue_counts(queue) == (1, 0), timeout=5)  # back in the queue
    survivor = runtimes(RABBIT_URL)
    got = []
    survivor.add_route('kazoo:consumer-event-a', lambda p, m: got.append((p['n'], m.redelivered)))
    survivor.subscribe(exchange, '#', queue=queue, exchange_type='topic', auto_delete=False)
    survivor.start()
    assert wait_for(lambda: got) == [(1, True)]
    survivor.stop()

    run_dying('early', 2)  # acked before the handler ran: lost with the process
    assert wait_for(lambda: queue_counts(queue) == (0, 0), timeout=5)


# -- broker-side connection loss -------------------------------------------

def test_reconnect_after_broker_closes_connections_loses_nothing(runtimes):
    exchange = unique('ex')
    consumer = runtimes(RABBIT_URL, workers=4)
    seen, events = [], []
    consumer.add_route('kazoo:consumer-event-t', lambda p, m: seen.append(p['n']))
    consumer.add_route('kazoo:consumer-event-connection',
                       lambda p, m: events.append((p['Event-Name'], p['Link'])))
    consumer.subscribe(exchange, '#', exchange_type='topic', queue=unique('q'),
                       auto_delete=False)
    consumer.start()
    assert consumer.wait_connected(5)
    publisher = runtimes(RABBIT_URL)
    publisher.start()
    total = 20000
    sent = []

    def produce():
        for n in range(total):
            publisher.publish(exchange, 'a', event('t', 'x', n=n), confirm=True)
            sent.append(n)

    job = gevent.spawn(produce)
    assert wait_for(lambda: len(sent) > 1000, timeout=20)
    assert close_connections(consumer.node, publisher.node) == 3
    assert not job.ready()  # the kill came mid-stream
    job.join(timeout=60)
    assert job.successful(), job.exception
    assert wait_for(lambda: set(seen) >= set(range(total)), timeout=30), \
        'missing: %s' % sorted(set(range(total)) - set(seen))[:20]
    print('\nreconnect test: %d published, %d handled (%d duplicates), reconnects '
          'consumer=%d publisher=%d' % (total, len(seen), len(seen) - len(set(seen)),
                                        consumer.stats()['reconnects'],
                                        publisher.stats()['reconnects']))
    assert wait_for(lambda: publisher.connected and consumer.connected)
    assert consumer.stats()['reconnects'] >= 2, str(consumer.stats())
    assert publisher.stats()['reconnects'] >= 1, str(publisher.stats())
    assert ('closed', 'consume') in events and events.count(('open', 'consume')) >= 2
    rabbitmqctl('delete_queue', consumer._subscriber.subscriptions[0].queue_in_use, check=False)


@pytest.mark.parametrize('started', [False, True], ids=['caller-driven', 'background'])
def test_pending_query_fails_at_once_when_the_connection_dies(runtimes, responder, started):
    exchange = unique('callmgr')
    responder(exchange, delay=5)
    kz = runtimes(RABBIT_URL)
    if started:
        kz.start()
        assert kz.wait_connected(5)
    pending_when_down = []
    kz._pub_link.on_down(lambda link, exc: pending_when_down.append(kz._replies.pending))
    job = gevent.spawn(kz.query, exchange, 'route.req', event('route', 'req'), timeout=30)
    assert wait_for(lambda: kz._replies.pending == 1, timeout=10)
    assert close_connections(kz.node) >= 1
    job.join(timeout=25)   # only a bound on the wait: the query's own timeout is 30 s
    # Failed by the loss of the connection itself, not by its timeout: the waiting query
    # was failed before any other on-down callback ran.
    assert isinstance(job.exception, ConnectionLost), job.exception
    assert pending_when_down == [0]
    # The next call reconnects (caller-driven) or finds the reconnected link.
    responder(exchange, routing_key='route.fast')
    wait_for(lambda: kz.connected or not started, timeout=5)
    assert kz.query(exchange, 'route.fast', event('route', 'req', To='b'))['Answer'] == 'b'


def test_broker_outage_buffers_publishes_and_flushes_them_in_order(runtimes, cleanup):
    queues, exchanges = cleanup
    exchange, queue = unique('ex'), unique('q')
    queues.append(queue)
    exchanges.append(exchange)
    consumer = runtimes(RABBIT_URL, workers=1)
    seen = []
    consumer.add_route('kazoo:consumer-event-a', lambda p, m: seen.append(p['n']))
    consumer.subscribe(exchange, '#', queue=queue, exchange_type='topic', durable=True,
                       auto_delete=False, exchange_durable=True)
    consumer.start()
    publisher = runtimes(RABBIT_URL)
    publisher.start()
    assert consumer.wait_connected(5) and publisher.wait_connected(5)
    publisher.publish(exchange, 'a', event('a', 'b', n=0))
    assert wait_for(lambda: seen == [0])
    rabbitmqctl('stop_app')
    try:
        assert wait_for(lambda: not publisher.connected, timeout=10)
        for n in range(1, 101):
            publisher.publish(exchange, 'a', event('a', 'b', n=n))
        assert publisher.stats()['buffer_size'] == 100
        with pytest.raises(KazooError):
            publisher.query(exchange, 'a', event('a', 'b'), timeout=1)
    finally:
        rabbitmqctl('start_app')
    assert wait_for(lambda: len(seen) == 101, timeout=30), seen[-5:]
    assert seen == list(range(101))
    assert publisher.stats()['buffer_flushed'] == 100
    assert consumer.stats()['reconnects'] >= 1


def test_caller_driven_publish_after_broker_side_close_is_not_lost(runtimes):
    """A SIP worker publishes rarely: a close the broker sent meanwhile must be noticed."""
    exchange = unique('ex')
    consumer = runtimes(RABBIT_URL)
    seen = []
    consumer.add_route('kazoo:consumer-event-a', lambda p, m: seen.append(p['n']))
    consumer.subscribe(exchange, '#', exchange_type='topic')
    consumer.start()
    assert consumer.wait_connected(5)
    worker = runtimes(RABBIT_URL)  # never started, like a SIP worker
    worker.publish(exchange, 'a', event('a', 'b', n=1))
    assert wait_for(lambda: seen == [1])
    assert close_connections(worker.node) == 1
    gevent.sleep(0.5)  # the worker is idle: nothing reads its socket
    worker.publish(exchange, 'a', event('a', 'b', n=2))
    assert wait_for(lambda: seen == [1, 2], timeout=5), seen
    assert worker.stats()['reconnects'] == 1


def test_consumer_cancelled_by_the_broker_is_restored(runtimes):
    exchange, queue = unique('ex'), unique('q')
    kz = runtimes(RABBIT_URL)
    seen = []
    kz.add_route('kazoo:consumer-event-a', lambda p, m: seen.append(p['n']))
    kz.subscribe(exchange, '#', queue=queue, exchange_type='topic')
    kz.start()
    assert kz.wait_connected(5)
    rabbitmqctl('delete_queue', queue)  # an operator deletes it under us
    assert wait_for(lambda: queue_counts(queue) is not None, timeout=5)
    kz.publish(exchange, 'a', event('a', 'b', n=1))
    assert wait_for(lambda: seen == [1]), seen
    assert kz.stats()['reconnects'] == 0  # restored without dropping the connection


@pytest.fixture
def proxy():
    """Start tests/integration/stall_proxy.py; returns (its AMQP URL, its process)."""
    procs = []

    def start(stall=0.0, period=1.0):
        port = 25000 + (os.getpid() * 7 + len(procs)) % 5000
        proc = subprocess.Popen(['/usr/bin/python3', os.path.join(os.path.dirname(__file__),
                                                                'stall_proxy.py'),
                                 str(port), str(stall), str(period)], stdout=subprocess.PIPE,
                                text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == 'ready'
        return 'amqp://guest:guest@127.0.0.1:%d//' % port, proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_writes_that_wait_for_a_slow_broker_do_not_drop_the_connection(runtimes, proxy):
    """A writer waiting for a full socket must not inherit the reader's short timeout."""
    url, _ = proxy(stall=0.5, period=1.0)
    if True:
        kz = runtimes(url)
        kz.start()
        assert kz.wait_connected(10)
        payload = event('a', 'b', Pad='x' * 4000)
        errors = []

        def publish(until):
            while monotonic() < until:
                try:
                    kz.publish('amq.topic', 'nowhere', payload)
                except KazooError as exc:
                    errors.append(exc)
                gevent.sleep(0)

        until = monotonic() + 3.0  # three stalls
        gevent.joinall([gevent.spawn(publish, until) for _ in range(10)], timeout=60)
        stats = kz.stats()
        print('\nstalling broker: 4 KB messages for 3 s: %r' % (
            {k: v for k, v in stats.items() if v},))
        assert errors == []
        assert stats['published'] > 1000 and stats['buffered'] == 0
        assert stats['reconnects'] == 0 and stats['connection_errors'] == 0


@pytest.mark.parametrize('blocking', [True, False], ids=['blocking', 'cooperative'])
def test_caller_driven_link_leaves_a_frozen_broker_on_the_next_call(runtimes, responder,
                                                                    proxy, blocking):
    """A frozen broker never closes TCP: after a silent timeout the next call probes it,
    gives up on it within PROBE_GRACE, and queries the next broker in the list."""
    exchange = unique('callmgr')
    if blocking:  # the caller blocks its whole process: answer from another one
        other = subprocess.Popen([sys.executable, '-m', 'tests.integration.responders',
                                  exchange], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        request_cleanup = other
        assert other.stdout.readline().strip() == 'ready'
    else:
        request_cleanup = None
        responder(exchange)
    url, proc = proxy()
    kz = runtimes([url, RABBIT_URL], query_timeout=1.0, blocking=blocking)
    assert kz.query(exchange, 'route.req', event('route', 'req', To='a'))['Answer'] == 'a'
    proc.send_signal(signal.SIGUSR1)  # freeze
    with pytest.raises(QueryTimeout):
        kz.query(exchange, 'route.req', event('route', 'req', To='b'))
    started = monotonic()
    # Answered within its own 1 s timeout: it did not wait for the frozen broker.
    reply = kz.query(exchange, 'route.req', event('route', 'req', To='c'))
    took = monotonic() - started
    print('\nfrozen broker: next call answered by the next broker in %.3fs' % took)
    assert reply['Answer'] == 'c'
    assert kz._pub_link.host == '127.0.0.1:5672'
    assert kz.stats()['reconnects'] == 1
    # A healthy broker answers the probe: a query that merely timed out changes nothing.
    with pytest.raises(QueryTimeout):
        kz.query('amq.topic', 'route.req', event('route', 'req', To='d'), timeout=0.3,
                 mandatory=False)
    assert kz.query(exchange, 'route.req', event('route', 'req', To='e'))['Answer'] == 'e'
    assert kz.stats()['reconnects'] == 1
    if request_cleanup is not None:
        request_cleanup.kill()
        request_cleanup.wait()
