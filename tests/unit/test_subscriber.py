"""Subscription set-up across connections, with a fake link (no broker)."""

import gevent
from amqp.exceptions import NotFound

from kazoo_green._consume import Subscriber, Subscription
from kazoo_green._dispatch import Dispatcher, RouteTable
from kazoo_green._stats import Stats
from kazoo_green.errors import NotConnected

from ..conftest import wait_for


class FakeChannel(object):
    def __init__(self, conn):
        self.conn = conn
        self.channel_id = len(conn.channels) + 1

    def exchange_declare(self, **kwargs):
        pass

    def queue_declare(self, queue, **kwargs):
        self.conn.declared.append(queue)

    def queue_bind(self, queue, exchange, routing_key):
        if self.conn.refuse_binds:
            self.conn.refuse_binds -= 1
            raise NotFound("NOT_FOUND - no queue '%s' in vhost '/'" % queue)

    def basic_qos(self, *args):
        pass

    def basic_consume(self, queue, **kwargs):
        self.conn.consuming.append(queue)


class FakeConn(object):
    def __init__(self, refuse_binds=0):
        self.channels = []
        self.declared = []
        self.consuming = []
        self.refuse_binds = refuse_binds

    def channel(self):
        channel = FakeChannel(self)
        self.channels.append(channel)
        return channel


class FakeLink(object):
    """What Subscriber uses of a background Link; ``connected`` is set by the test."""

    channel_errors = (NotFound,)
    brokers = ()   # one broker (SweepGuard looks at clusters only; see test_sweep)

    def __init__(self):
        self.connected = False
        self._conn = None
        self._reader = object()   # started: a background reader
        self.up_hooks, self.down_hooks, self.on_up_hooks = [], [], []

    def on_up(self, fn):
        self.on_up_hooks.append(fn)

    def add_up_hook(self, fn):
        self.up_hooks.append(fn)

    def on_down(self, fn):
        self.down_hooks.append(fn)

    def rpc(self, fn, *args):
        return fn(*args)

    def consume(self, channel, queue, tag, callback, no_ack, **kwargs):
        channel.basic_consume(queue=queue)

    def forget_consumer(self, tag):
        pass

    def ensure(self, deadline=None, wait=False):
        if not wait_for(lambda: self.connected, timeout=1):
            raise NotConnected('fake link down')

    def connect(self, conn, after_hooks=0.0):
        """The up-hooks run before the link counts as up (as Link.connect), and the
        connection's later hooks may take a while (a quorum queue electing a leader)."""
        self._conn = conn
        for hook in self.up_hooks:
            hook(conn)
        gevent.sleep(after_hooks)
        self.connected = True

    def lose(self):
        self.connected = False
        for hook in self.down_hooks:
            hook(self, OSError('gone'))


def subscriber(*subs):
    link = FakeLink()
    s = Subscriber(link, Dispatcher(1), RouteTable(), Stats(), 'kgtest@test', 2)
    for sub in subs:
        s.add(sub)
    return link, s


def test_made_up_queue_names_are_new_on_every_connection():
    """RabbitMQ sweeps a dead node's transient queues by name, from every surviving node,
    a while after the node died: the queue declared on the next connection must not have
    the old name (rabbitmq-server#6271)."""
    auto = Subscription('callmgr', 'fo.req')
    named = Subscription('ex', '#', queue='fixed', durable=True, auto_delete=False)
    link, s = subscriber(auto, named)
    names = []
    for _ in range(3):
        conn = FakeConn()
        link.connect(conn)
        names.append(conn.declared)
        link.lose()
    assert [n[1] for n in names] == ['fixed'] * 3   # a name given is kept
    auto_names = [n[0] for n in names]
    assert len(set(auto_names)) == 3, auto_names
    assert auto_names[0].endswith('-0')             # the first one as before


def test_made_up_names_of_queues_that_outlive_their_consumer_are_kept():
    """A durable queue, or one that is not auto-delete, under a new name would leave the
    old one filling up with nobody consuming it."""
    durable = Subscription('ex', '#', durable=True)
    lasting = Subscription('ex', '#', auto_delete=False)
    link, s = subscriber(durable, lasting)
    names = []
    for _ in range(2):
        conn = FakeConn()
        link.connect(conn)
        names.append(conn.declared)
        link.lose()
    assert names[0] == names[1]


def test_made_up_queue_name_is_new_after_a_broker_cancel():
    auto = Subscription('callmgr', 'fo.req')
    link, s = subscriber(auto)
    conn = FakeConn()
    link.connect(conn)
    s._cancelled(auto.tag)
    assert wait_for(lambda: len(conn.declared) == 2, timeout=2)
    assert conn.declared[0] != conn.declared[1]
    assert auto.channel is not None


def test_setup_refused_during_a_connect_is_retried_once_the_link_is_up():
    """A subscription the broker refuses while a connect sets up the others is retried on
    that connection, even if the remaining set-up takes longer than the first retry delay
    (the link only counts as up after every hook)."""
    first = Subscription('callmgr', 'fo.req')
    slow = Subscription('ex', '#', queue='qq', durable=True, auto_delete=False)
    link, s = subscriber(first, slow)
    conn = FakeConn(refuse_binds=1)
    link.connect(conn, after_hooks=0.3)   # > RECONNECT_DELAY (0.1 s)
    assert wait_for(lambda: first.channel is not None, timeout=3), conn.declared
    assert s.stats.setup_errors == 1
    assert conn.consuming.count(first.queue_in_use) == 1
