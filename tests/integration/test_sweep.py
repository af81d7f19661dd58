"""A fixed-name queue that a cluster's dead-node clean-up deleted is declared again.

RabbitMQ 3.x deletes a dead node's transient queues by name, in transactions of their own
on every surviving node (``rabbit_amqqueue:on_node_down``); a queue declared again under
that name on another node in between loses its record and bindings while its process and
consumer live on (rabbitmq-server#6271). The race itself is timing; its outcome is not:
the broker here runs the clean-up's own two steps (the record and the routes deleted in a
transaction, then the bindings' deletions processed) for one queue, by ``rabbitmqctl
eval``. Two broker URLs (the same node twice) make it a cluster to kazoo_green.
"""

import kazoo_green  # noqa: F401  (patches gevent before kombu is imported)

import logging

from kazoo_green import KazooError, _sweep

from ..conftest import (RABBIT_URL, clean_up_like_node_down, event, rabbitmqctl, unique,
                        wait_for)

URLS = [RABBIT_URL, RABBIT_URL]


def queue_consumers(name):
    for line in rabbitmqctl('list_queues', 'name', 'consumers').splitlines():
        parts = line.split('\t')
        if parts[0] == name:
            return int(parts[1])
    return None


def test_a_named_queue_deleted_by_the_clean_up_is_declared_and_consumed_again(
        runtimes, caplog):
    exchange, queue = unique('kgt-sweep'), unique('kgt-sweep-q')
    got = []
    responder = runtimes(URLS, app_name='responder')
    responder.add_route('kazoo:consumer-event-sweep-req',
                        lambda request, meta: (got.append(request['n']),
                                               responder.respond(request, {
                                                   'Event-Category': 'sweep',
                                                   'Event-Name': 'resp', 'n': request['n']},
                                                   meta)))
    responder.subscribe(exchange, 'sweep.req', exchange_type='topic', queue=queue,
                        auto_delete=True, ack='early')
    responder.start()
    assert responder.wait_connected(5)
    asker = runtimes(RABBIT_URL)
    asker.start()
    assert asker.wait_connected(5)
    assert asker.query(exchange, 'sweep.req', event('sweep', 'req', n=1), timeout=5)['n'] == 1
    caplog.set_level(logging.WARNING, logger='kazoo_green')
    clean_up_like_node_down(queue)
    # The broker routes nothing to the queue any more (its process and consumer live on),
    # unless the guard already looked (its checks start 0.2 s after the connect).
    assert queue_consumers(queue) is None or responder.stats()['queues_swept'] == 1
    try:
        asker.query(exchange, 'sweep.req', event('sweep', 'req', n=2), timeout=5)
        unroutable = False
    except KazooError as exc:
        unroutable = 'NO_ROUTE' in str(exc)
    assert unroutable or responder.stats()['queues_swept'] == 1
    assert wait_for(lambda: responder.stats()['queues_swept'] == 1,
                    timeout=_sweep.CHECKS[-1] + 5)
    assert wait_for(lambda: queue_consumers(queue) == 1, timeout=10)
    assert asker.query(exchange, 'sweep.req', event('sweep', 'req', n=3), timeout=5)['n'] == 3
    assert 3 in got
    assert any('was deleted by the broker' in r.getMessage() for r in caplog.records)
    assert responder.stats()['setup_errors'] == 0


def test_one_broker_url_is_not_looked_at(runtimes):
    """A single broker cannot be swept by others: no checks, no connections for them."""
    kz = runtimes(RABBIT_URL)
    kz.subscribe(unique('kgt-sweep'), 'x', exchange_type='topic', queue=unique('kgt-sweep-q'),
                 auto_delete=True)
    kz.start()
    assert kz.wait_connected(5)
    guard = kz._subscriber.sweep
    assert not guard.enabled and guard.due is None
