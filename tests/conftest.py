"""Shared test helpers: unique names, runtimes that are always stopped, broker control."""

import kazoo_green  # noqa: F401  (patches gevent before kombu is imported)

import os
import subprocess
import uuid
from time import monotonic

import gevent
import pytest

RABBIT_URL = os.environ.get('KAZOO_GREEN_TEST_BROKER', 'amqp://guest:guest@127.0.0.1:5672//')


def unique(prefix='kgt'):
    return '%s-%s' % (prefix, uuid.uuid4().hex[:10])


def event(category, name, **fields):
    """A Kazoo payload: Event-Category, Event-Name and ``fields``."""
    payload = {'Event-Category': category, 'Event-Name': name}
    payload.update(fields)
    return payload


def wait_for(predicate, timeout=10.0, interval=0.01):
    """Poll ``predicate`` (yielding to greenlets) until true; returns its last value."""
    deadline = monotonic() + timeout
    value = predicate()
    while not value and monotonic() < deadline:
        gevent.sleep(interval)
        value = predicate()
    return value


@pytest.fixture
def runtimes():
    """Factory of Kazoo runtimes that are stopped at the end of the test."""
    made = []

    def make(url, **kwargs):
        kwargs.setdefault('app_name', 'kgtest')
        kwargs.setdefault('node', unique('kgtest') + '@test')
        kz = kazoo_green.Kazoo(url, **kwargs)
        made.append(kz)
        return kz

    yield make
    for kz in made:
        try:
            kz.stop(timeout=2)
        except Exception:
            pass


def rabbitmqctl(*args, check=True):
    return subprocess.run(('rabbitmqctl', '-q') + args, capture_output=True, text=True,
                          check=check, timeout=60).stdout


def clean_up_like_node_down(queue):
    """What a RabbitMQ 3.x cluster does to a queue name when the queue's node died
    (``rabbit_amqqueue:on_node_down``'s own calls, for this one name, on the local broker):
    its record and routes deleted, then the bindings' deletions processed (see
    kazoo_green._sweep)."""
    rabbitmqctl('eval', (
        'QN = rabbit_misc:r(<<"/">>, queue, <<"%s">>), '
        'D = rabbit_misc:execute_mnesia_transaction(fun () -> '
        'ok = mnesia:delete({rabbit_queue, QN}), '
        'rabbit_binding:remove_transient_for_destination(QN) end), '
        'rabbit_misc:execute_mnesia_tx_with_tail(fun () -> '
        'rabbit_binding:process_deletions(D, <<"rmq-internal">>) end), ok.' % queue))


def close_connections(*name_parts):
    """Close, from the broker side, every connection whose name contains one of ``name_parts``."""
    out = rabbitmqctl('list_connections', 'pid', 'client_properties')
    closed = 0
    for line in out.splitlines():
        if line.startswith('<') and any(part in line for part in name_parts):
            pid = line.split('\t', 1)[0]
            rabbitmqctl('close_connection', pid, 'closed by the test suite', check=False)
            closed += 1
    return closed


def queue_counts(name):
    """(ready, unacked) message counts of queue ``name``, or None if it does not exist."""
    out = rabbitmqctl('list_queues', 'name', 'messages_ready', 'messages_unacknowledged')
    for line in out.splitlines():
        parts = line.split('\t')
        if parts[0] == name:
            return int(parts[1]), int(parts[2])
    return None
