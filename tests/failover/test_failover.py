"""Failover on a real 3-node RabbitMQ cluster (tests/cluster.py), with real kills.

Every runtime gets all three URLs, round-robin. Queues that must survive a node are
quorum queues. Each scenario prints its numbers.
"""

import kazoo_green  # noqa: F401  (gevent's patching first)

from time import monotonic

import gevent
import pytest

from kazoo_green import KazooError, NotConnected, QueryTimeout

from ..cluster import cluster, running_cluster  # noqa: F401  (fixtures)
from ..conftest import unique, wait_for
from ..integration.responders import PlainResponder

TOTAL = 20000


def event(n, **fields):
    payload = {'Event-Category': 'fo', 'Event-Name': 'x', 'n': n}
    payload.update(fields)
    return payload


def node_of(c, link):
    """Which cluster node (1-based) a connected link talks to."""
    port = int(link.host.rsplit(':', 1)[1])
    return c.ports.index(port) + 1


def quorum_queue(c, runtimes, exchange, queue):
    """Declare a durable topic exchange + quorum queue bound with '#' (then let go)."""
    holder = runtimes(c.urls)
    holder.subscribe(exchange, '#', queue=queue, exchange_type='topic', durable=True,
                     auto_delete=False, exchange_durable=True,
                     queue_arguments={'x-queue-type': 'quorum'})
    holder.start()
    assert holder.wait_connected(20)
    holder.stop()


def consume_all(c, runtimes, exchange, queue, expect, ack='late', timeout=120, kill_after=None):
    """Consume ``queue`` until every n in range(expect) was seen; optionally kill the
    consumer's node once ``kill_after`` messages were handled. Returns (seen, redelivered,
    killed node or None)."""
    kz = runtimes(c.urls, workers=8, prefetch=200, heartbeat=2)
    seen, redelivered = [], [0]

    @kz.event_route('kazoo:consumer-event-fo-x')
    def handle(payload, meta):
        seen.append(payload['n'])
        if meta.redelivered:
            redelivered[0] += 1

    kz.subscribe(exchange, '#', queue=queue, exchange_type='topic', durable=True,
                 auto_delete=False, exchange_durable=True, ack=ack,
                 queue_arguments={'x-queue-type': 'quorum'})
    kz.start()
    assert kz.wait_connected(20)
    victim = None
    if kill_after is not None:
        assert wait_for(lambda: len(seen) >= kill_after, timeout=60)
        victim = node_of(c, kz._sub_link)
        c.kill(victim)
    wanted = set(range(expect))
    wait_for(lambda: wanted.issubset(seen), timeout=timeout, interval=0.1)
    gevent.sleep(1)  # let redeliveries in flight arrive, to count them
    kz.stop()
    return seen, redelivered[0], victim


def publish_all(kz, exchange, total, greenlets=50):
    confirmed, errors = set(), []

    def producer(k):
        for n in range(k, total, greenlets):
            try:
                kz.publish(exchange, 'fo.x', event(n), confirm=True, persistent=True)
                confirmed.add(n)
            except KazooError as exc:
                errors.append((n, exc))

    return confirmed, errors, [gevent.spawn(producer, k) for k in range(greenlets)]


def test_1_confirmed_publishes_survive_a_kill_of_the_connected_node(running_cluster, runtimes):
    c = running_cluster
    exchange, queue = unique('fo-ex'), unique('fo-q')
    quorum_queue(c, runtimes, exchange, queue)
    kz = runtimes(c.urls, confirm_timeout=60, heartbeat=2)
    kz.start()
    assert kz.wait_connected(20)
    victim = node_of(c, kz._pub_link)
    confirmed, errors, jobs = publish_all(kz, exchange, TOTAL)
    assert wait_for(lambda: len(confirmed) >= TOTAL // 4, timeout=120)
    at_kill = len(confirmed)
    c.kill(victim)
    started = monotonic()
    gevent.joinall(jobs, timeout=300)
    took = monotonic() - started
    stats = kz.stats()
    seen, _, _ = consume_all(c, runtimes, exchange, queue, TOTAL)
    duplicates = len(seen) - len(set(seen))
    print('\n[1] %d confirmed publishes, node %d killed after %d; %d unconfirmed errors; '
          'the rest took %.1fs; queue held %d messages = %d distinct + %d duplicates '
          '(re-sent unconfirmed); reconnects %d'
          % (TOTAL, victim, at_kill, len(errors), took, len(seen), len(set(seen)), duplicates,
             stats['reconnects']))
    assert errors == []
    assert confirmed == set(range(TOTAL))
    assert set(seen) == set(range(TOTAL))  # every confirmed message is there
    assert stats['reconnects'] >= 1


@pytest.mark.parametrize('ack', ['late', 'early'])
def test_2_3_consumer_backlog_survives_a_kill_of_its_node(running_cluster, runtimes, ack):
    c = running_cluster
    exchange, queue = unique('fo-ex'), unique('fo-q')
    quorum_queue(c, runtimes, exchange, queue)
    publisher = runtimes(c.urls)
    publisher.start()
    confirmed, errors, jobs = publish_all(publisher, exchange, TOTAL)
    gevent.joinall(jobs, timeout=300)
    assert not errors and len(confirmed) == TOTAL
    seen, redelivered, victim = consume_all(c, runtimes, exchange, queue, TOTAL, ack=ack,
                                            kill_after=TOTAL // 4, timeout=90)
    distinct = set(seen)
    lost = TOTAL - len(distinct)
    print('\n[%s] %s-ack consumer, %d-message backlog, its node %d killed: handled %d '
          '(%d distinct, %d duplicates, %d flagged redelivered), lost %d'
          % ('2' if ack == 'late' else '3', ack, TOTAL, victim, len(seen), len(distinct),
             len(seen) - len(distinct), redelivered, lost))
    if ack == 'late':
        assert lost == 0
        assert redelivered >= len(seen) - len(distinct)  # duplicates are visible as such
    else:
        # Early ack: a message acked just before its handler runs is the broker's no more.
        # The process survives a node kill, so handlers still run; what early ack costs
        # is shown when the process itself dies (tests/integration). Report, bound it.
        assert lost <= 200, lost  # at most one prefetch window


def test_5_all_nodes_down_then_back(running_cluster, runtimes):
    c = running_cluster
    exchange, queue = unique('fo-ex'), unique('fo-q')
    quorum_queue(c, runtimes, exchange, queue)
    consumer = runtimes(c.urls, workers=1, heartbeat=2)
    seen = []
    consumer.add_route('kazoo:consumer-event-fo-x', lambda p, m: seen.append(p['n']))
    consumer.subscribe(exchange, '#', queue=queue, exchange_type='topic', durable=True,
                       auto_delete=False, exchange_durable=True,
                       queue_arguments={'x-queue-type': 'quorum'})
    consumer.start()
    publisher = runtimes(c.urls, heartbeat=2)
    publisher.start()
    worker = runtimes(c.urls, query_timeout=2.0, blocking=False)  # caller-driven, like a SIP worker
    assert consumer.wait_connected(20) and publisher.wait_connected(20)
    publisher.publish(exchange, 'fo.x', event(0), confirm=True)
    assert wait_for(lambda: seen == [0])
    for i in c.indices:
        c.stop_node(i)
    down_at = monotonic()
    assert wait_for(lambda: not publisher.connected, timeout=10)
    for n in range(1, 101):
        publisher.publish(exchange, 'fo.x', event(n))
    assert publisher.stats()['buffer_size'] == 100
    started = monotonic()
    with pytest.raises(NotConnected):
        worker.query(exchange, 'fo.x', event(-1))
    fail_fast = monotonic() - started
    gevent.sleep(max(0.0, 10 - (monotonic() - down_at)))
    c.start_apps()
    back_at = monotonic()
    assert wait_for(lambda: len(seen) == 101, timeout=60), seen[-5:]
    print('\n[5] all nodes down 10 s: query failed in %.3fs; 100 publishes buffered, flushed '
          'in order %.1fs after the nodes were back; consumer reconnects %d'
          % (fail_fast, monotonic() - back_at, consumer.stats()['reconnects']))
    assert fail_fast < 0.5
    assert seen == list(range(101))


def test_6a_background_connection_notices_a_frozen_node(running_cluster, runtimes):
    """Heartbeats (2 s here) notice a node frozen with SIGSTOP within ~2 intervals.

    Moving on is stalled by RabbitMQ itself while the node stays frozen: queue
    declarations wait cluster-wide until net_ticktime declares it down (see 6b), so this
    test thaws the node once the loss was noticed and checks the link comes back."""
    c = running_cluster
    background = runtimes(c.urls, heartbeat=2)
    background.start()
    assert background.wait_connected(20) and node_of(c, background._pub_link) == 1
    c.freeze(1)
    frozen_at = monotonic()
    try:
        noticed = wait_for(lambda: background.stats()['connection_errors'] >= 1, timeout=15)
        detected = monotonic() - frozen_at
    finally:
        c.thaw(1)
    assert noticed, 'a frozen node was not noticed within 15 s'
    assert wait_for(lambda: background.connected, timeout=60)
    background.publish('amq.topic', 'fo.after', event(1), confirm=True)
    print('\n[6] node 1 frozen: the background connection (heartbeat 2 s) noticed in %.1fs; '
          'reconnected to node %d after the thaw' % (detected, node_of(c, background._pub_link)))
    assert detected < 3 * 2 + 1


@pytest.mark.xfail(strict=True, reason=(
    'open: while a node is frozen (not dead), RabbitMQ stalls queue declarations '
    'cluster-wide until net_ticktime (60 s) declares it down, so the reconnect cannot '
    'declare the reply queue within the query timeout'))
def test_6b_caller_driven_worker_leaves_a_frozen_node_on_its_next_call(running_cluster,
                                                                      runtimes):
    c = running_cluster
    exchange = unique('fo-callmgr')
    responder = PlainResponder(exchange, 'route.req', 'generic', url=c.url(3))
    try:
        worker = runtimes(c.urls, query_timeout=1.0)  # caller-driven
        assert worker.query(exchange, 'route.req', {'To': 'a'})['Answer'] == 'a'
        assert node_of(c, worker._pub_link) == 1
        c.freeze(1)
        with pytest.raises(QueryTimeout):
            worker.query(exchange, 'route.req', {'To': 'b'})
        started = monotonic()
        reply = worker.query(exchange, 'route.req', {'To': 'c'})
        assert reply['Answer'] == 'c' and monotonic() - started < 1.0
    finally:
        c.thaw(1)
        responder.close()
