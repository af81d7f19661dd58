"""Self-test of tests/cluster.py against real nodes: one boot shared by every scenario.

Proves: three new nodes form one cluster that does not include the machine's node on :5672;
a quorum queue declared and fed on node 1 is consumed on node 3; kill -9 of node 2 is seen
by the cluster, restart(2) brings it back and the quorum queue kept its messages; a frozen
node makes blocking client calls time out and works again after thaw; stop/start of a node
and ensure_all_running() bring nodes back.
"""

import kazoo_green  # noqa: F401  (gevent monkey patching before kombu is imported)

import json
import socket
import subprocess
import time
import uuid

import pytest
from kombu import Connection, Queue

from tests.cluster import ClusterError, cluster, running_cluster  # noqa: F401  (fixtures)


def qname():
    return 'kgc-selftest-%s' % uuid.uuid4().hex[:8]


def wait_until(predicate, timeout=15.0, interval=0.2):
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def declare_quorum(url, name):
    with Connection(url, connect_timeout=5) as conn:
        conn.channel().queue_declare(name, durable=True, auto_delete=False,
                                     arguments={'x-queue-type': 'quorum'})


def delete_queue(url, name):
    try:
        with Connection(url, connect_timeout=5) as conn:
            conn.channel().queue_delete(name)
    except Exception:
        pass


def publish(url, name, bodies):
    """Publish persistent JSON messages with publisher confirms (returns once all confirmed)."""
    with Connection(url, connect_timeout=5, transport_options={'confirm_publish': True}) as conn:
        producer = conn.Producer()
        for body in bodies:
            producer.publish(body, exchange='', routing_key=name, serializer='json',
                             delivery_mode=2, confirm_timeout=10)


def consume(url, name, count, timeout=15.0):
    """Consume (and ack) ``count`` messages from queue ``name`` on the node at ``url``."""
    got = []

    def on_message(body, message):
        got.append(body)
        message.ack()

    with Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        channel.basic_qos(0, 100, False)
        with conn.Consumer(queues=[Queue(name, no_declare=True)], channel=channel,
                           callbacks=[on_message], accept=['json']):
            deadline = time.monotonic() + timeout
            while len(got) < count and time.monotonic() < deadline:
                try:
                    conn.drain_events(timeout=max(0.1, deadline - time.monotonic()))
                except socket.timeout:
                    break
    return got


def system_cluster_status():
    """cluster_status of the machine's own node (read-only; default node of rabbitmqctl)."""
    out = subprocess.run(['rabbitmqctl', '-q', 'cluster_status', '--formatter', 'json'],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_three_new_nodes_form_one_cluster_without_the_system_node(running_cluster):
    c = running_cluster
    names = [c.node(i) for i in c.indices]
    assert len(names) == 3 and names == ['%s@%s' % (n, c.host) for n in c.names]
    assert c.running_nodes() == sorted(names)
    for i in c.indices:  # every node sees the same three, and only them
        assert c.members(via=i) == sorted(names)
    status = c.cluster_status()
    listeners = [(l['node'], l['interface'], l['port'], l['protocol'])
                 for node_listeners in status['listeners'].values() for l in node_listeners]
    for i in c.indices:
        assert (c.node(i), '127.0.0.1', c.port(i), 'amqp') in listeners
        assert (c.node(i), '127.0.0.1', c.port(i) + 20000, 'clustering') in listeners
    assert all(iface == '127.0.0.1' for _, iface, _, _ in listeners)

    system = system_cluster_status()
    system_nodes = set(system['disk_nodes']) | set(system['ram_nodes']) | \
        set(system['running_nodes'])
    assert not system_nodes & set(names), system_nodes
    assert not system_nodes & set(status['disk_nodes'] + status['ram_nodes'])
    assert c.urls == ['amqp://guest:guest@127.0.0.1:%d//' % p for p in c.ports]
    for i in c.indices:
        assert c.alive(i) and c.pid(i) > 1


def test_quorum_queue_publish_on_node1_consume_on_node3(running_cluster):
    c = running_cluster
    q = qname()
    try:
        declare_quorum(c.urls[0], q)
        rows = c.ctl(1, 'list_queues', 'name', 'type', 'members', '--no-table-headers')
        row = [line for line in rows.splitlines() if line.startswith(q + '\t')]
        assert row and '\tquorum\t' in row[0], rows
        assert all(c.node(i) in row[0] for i in c.indices), row  # a member on every node

        with Connection(c.urls[0], connect_timeout=5) as held:
            held.connect()
            assert wait_until(lambda: c.connection_count(1) >= 1)
        publish(c.urls[0], q, [{'n': n} for n in range(10)])
        assert wait_until(lambda: c.queue_messages(q) == 10)
        got = consume(c.urls[2], q, 10)
        assert [m['n'] for m in got] == list(range(10))
        assert wait_until(lambda: c.queue_messages(q) == 0)
    finally:
        delete_queue(c.urls[0], q)


@pytest.mark.harness
def test_kill_node2_then_restart_keeps_quorum_messages(running_cluster):
    c = running_cluster
    q = qname()
    try:
        declare_quorum(c.urls[0], q)
        publish(c.urls[0], q, [{'n': n} for n in range(25)])
        assert wait_until(lambda: c.queue_messages(q) == 25)

        old_pid = c.pid(2)
        t0 = time.monotonic()
        c.kill(2)
        assert not c.alive(2)
        assert wait_until(lambda: c.running_nodes() == sorted([c.node(1), c.node(3)]), 15)
        seen_down = time.monotonic() - t0
        publish(c.urls[2], q, [{'n': n} for n in range(25, 30)])  # majority still accepts

        t0 = time.monotonic()
        c.restart(2)
        restarted = time.monotonic() - t0
        assert c.running_nodes() == sorted(c.node(i) for i in c.indices)
        assert c.alive(2) and c.pid(2) != old_pid
        assert wait_until(lambda: c.queue_messages(q) == 30, 20)
        got = consume(c.urls[1], q, 30)  # read back through the restarted node
        assert sorted(m['n'] for m in got) == list(range(30))
        print('\nkill -9 seen by cluster_status after %.2f s; restart(2) took %.1f s'
              % (seen_down, restarted))
    finally:
        delete_queue(c.urls[0], q)


@pytest.mark.harness
def test_frozen_node_times_out_and_works_after_thaw(running_cluster):
    c = running_cluster
    q = qname()
    declare_quorum(c.urls[0], q)
    held = Connection(c.urls[2], connect_timeout=5, transport_options={'confirm_publish': True})
    try:
        held.connect()
        producer = held.Producer()
        producer.publish({'n': 0}, exchange='', routing_key=q, serializer='json',
                         confirm_timeout=5)
        assert c.connection_count(3) >= 1

        c.freeze(3)
        try:
            with open('/proc/%d/status' % c.pid(3)) as f:
                assert 'T (stopped)' in f.read()
            with pytest.raises(socket.timeout):  # the confirm never comes
                producer.publish({'n': 1}, exchange='', routing_key=q, serializer='json',
                                 confirm_timeout=1.5)
            with pytest.raises((socket.timeout, OSError)):  # the handshake never comes
                Connection(c.urls[2], connect_timeout=1).connect()
            # the other nodes still answer (a frozen node counts as running until
            # net_ticktime, 60 s, so freezes in tests stay well below that)
            assert c.running_nodes() == sorted(c.node(i) for i in c.indices)
        finally:
            c.thaw(3)

        with Connection(c.urls[2], connect_timeout=5) as fresh:
            ok = fresh.channel().queue_declare(q, passive=True)
            assert ok.queue == q
        publish(c.urls[2], q, [{'n': 2}])
        assert c.running_nodes() == sorted(c.node(i) for i in c.indices)
        assert wait_until(lambda: c.queue_messages(q) >= 2)
    finally:
        try:
            held.release()
        except Exception:
            pass
        delete_queue(c.urls[0], q)


@pytest.mark.harness
def test_stop_start_node_and_ensure_all_running(running_cluster):
    c = running_cluster
    c.stop_node(2)  # stop_app: VM up, AMQP listener closed
    assert c.alive(2)
    assert wait_until(lambda: c.node(2) not in c.running_nodes())
    with pytest.raises(OSError):
        socket.create_connection(('127.0.0.1', c.port(2)), timeout=2).close()
    c.start_node(2)
    assert c.running_nodes() == sorted(c.node(i) for i in c.indices)

    c.kill(3)           # leave a crashed node and a stopped app behind ...
    c.stop_node(1)
    assert c.running_nodes() == [c.node(2)]
    c.ensure_all_running()  # ... what the fixture does between tests
    assert c.running_nodes() == sorted(c.node(i) for i in c.indices)
    assert all(c.alive(i) for i in c.indices)


def test_timings_are_recorded(cluster):
    assert 0 <= cluster.timings['boot'] <= cluster.timings['start']
    print('\ncluster start() took %.1f s (VMs booted after %.1f s)'
          % (cluster.timings['start'], cluster.timings['boot']))
    with pytest.raises(IndexError):
        cluster.node(0)
    with pytest.raises(ClusterError):
        cluster.restart(1)  # still running: refused
