"""kazoo_green.kemi on memory:// with a fake KSR: async queries, fork handling, logging.

A simulated Kamailio instance is a few ``kemi.Kazoo`` runtimes sharing a node name
(hence the ``<node>-resume`` queue), as the processes of one instance do after the
fork: a "consumer process" running ``run_consumer()`` in a greenlet and a "SIP worker"
calling ``async_query`` from the test greenlet. ``FakeKSR`` runs ``t_continue`` into
the handler, runs the failure route when tm's timer of a suspended transaction fires,
and records the replies.
"""

import importlib.util
import logging
import os
import sys
from time import monotonic

import gevent
import pytest
from kombu import Connection, Exchange, Producer

import kazoo_green
from kazoo_green import KazooError, kemi
from kazoo_green.testing import Continue, fake_ksr

from ..conftest import unique, wait_for

MEM = 'memory://'
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def route_req(user):
    return {'Event-Category': 'route', 'Event-Name': 'req', 'To': user}


class Router(kemi.Handler):
    """The async half of examples/kamailio/router.py, recording every resume."""

    def __init__(self, kz):
        super(Router, self).__init__(kz)
        self.resumed = []  # (method, reply(), reply_error(), greenlet, monotonic())

    def _record(self, method):
        self.resumed.append((method, self.kz.reply(), self.kz.reply_error(),
                             gevent.getcurrent(), monotonic()))

    def route_reply(self, msg):
        import KSR
        self._record('route_reply')
        route = self.kz.reply().get('Route')
        if route:
            KSR.pv.sets('$ru', route)
            KSR.tm.t_reply(302, 'Moved Temporarily')
        else:
            KSR.tm.t_reply(404, 'Not Found')
        return 1

    def route_timeout(self, msg):
        import KSR
        self._record('route_timeout')
        KSR.tm.t_reply(503, 'Service Unavailable')
        return 1


class Instance(object):
    """One Kamailio instance: its processes share the node, hence the async queue."""

    def __init__(self, **kwargs):
        self.node = unique('kamailio') + '@test'
        self.kwargs = kwargs
        self.processes = []
        self.greenlets = []

    def process(self):
        kz = kemi.Kazoo(MEM, node=self.node, **self.kwargs)
        self.processes.append(kz)
        return kz

    def consumer(self):
        """The rtimer process: run_consumer() forever, in a greenlet."""
        kz = self.process()
        self.run(kz.run_consumer)
        assert wait_for(lambda: kz.stats()['consume_connected'], 5)
        return kz

    def run(self, fn, *args):
        greenlet = gevent.spawn(fn, *args)
        self.greenlets.append(greenlet)
        return greenlet

    def close(self):
        gevent.killall(self.greenlets)
        for kz in self.processes:
            try:
                kz.stop(timeout=2)
            except Exception:
                pass


@pytest.fixture
def kz_logger():
    """The ``kazoo_green`` logger, restored after the test (kemi.Handler changes it)."""
    logger = logging.getLogger('kazoo_green')
    saved = list(logger.handlers), logger.level, logger.propagate
    yield logger
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


@pytest.fixture
def fake(kz_logger):
    """A FakeKSR as ``KSR``; handler methods that raised (under t_continue) fail the test."""
    with fake_ksr() as fake:
        yield fake
    assert fake.errors == [], fake.log_lines('err')


@pytest.fixture
def kamailio(fake):
    """Factory of simulated Kamailio instances, stopped before the fake KSR goes."""
    made = []

    def make(**kwargs):
        made.append(Instance(**kwargs))
        return made[-1]

    yield make
    for instance in made:
        instance.close()


@pytest.fixture
def responder(runtimes):
    """A started plain runtime answering route.req on a fresh topic exchange.

    ``answer(request)`` gives the reply payload, or None for no reply. ``style``:
    ``reply_to`` (AMQP reply_to/correlation_id) or ``server_id`` (Kazoo: ``targeted``
    exchange, routing key Server-ID, Msg-ID copied). Returns (exchange, seen).
    """
    def make(answer, style='reply_to', on_request=None):
        kz = runtimes(MEM, app_name='responder')
        exchange = unique('callmgr')
        seen = []

        @kz.event_route('kazoo:consumer-event-route-req')
        def route(request, meta):
            seen.append((request, meta, on_request() if on_request else None))
            reply = answer(request)
            if reply is not None:
                kz.respond(request, reply, meta if style == 'reply_to' else None)

        kz.subscribe(exchange, 'route.req', exchange_type='topic', queue=unique('q'))
        kz.start()
        assert kz.wait_connected(5)
        return exchange, seen
    return make


def routed(request):
    return {'Route': 'sip:%s@10.0.0.9' % request['To']}


def put_on_queue(queue, body, correlation_id=None):
    """Put an arbitrary message straight on ``queue`` (default exchange)."""
    with Connection('memory://localhost/') as conn:
        props = {'correlation_id': correlation_id} if correlation_id else {}
        Producer(conn.channel()).publish(body, exchange=Exchange(''), routing_key=queue,
                                         content_type='application/json',
                                         content_encoding='binary', serializer=None,
                                         **props)


def async_id(t, deadline, on_reply='route_reply', on_timeout='route_timeout',
             exchange='callmgr'):
    """An async Msg-ID as kemi builds it, for transaction ``t``."""
    return 'kgasync:%d:%d:%s:%s:%d:%d:%s:%s' % (t.index, t.label, on_reply, on_timeout,
                                               int(deadline * 1000),
                                               int(monotonic() * 1000000), unique('id'),
                                               exchange)


# -- the async query, end to end -------------------------------------------------------

def test_reply_queues_of_one_node_in_one_process_never_share_a_name():
    """Two runtimes of one node in one process (a test's simulated instance; a script with
    two zones on one broker) each get a reply queue of their own: a shared one would hand
    one's replies to the other (a query timing out with its reply consumed elsewhere)."""
    from kazoo_green._query import ReplyWaiter

    class Link(object):
        def add_up_hook(self, hook):
            pass

        def on_down(self, callback):
            pass

    class Publisher(object):
        on_return = None

    waiters = [ReplyWaiter(Link(), Publisher(), None, 'kamailio@one') for _ in range(3000)]
    names = {w.server_id for w in waiters}
    assert len(names) == len(waiters)
    assert all(name.startswith('kamailio@one-<%d>-targeted-' % os.getpid()) for name in names)


@pytest.mark.parametrize('on_reply, on_timeout', [
    ('route-reply', 'route_timeout'), ('route_reply', 'x' * 65), (['route_reply'], 'x'),
    ('route_reply', None)])
def test_async_query_refuses_what_is_no_method_name_before_touching_the_transaction(
        kamailio, fake, on_reply, on_timeout):
    worker = kamailio().process()
    fake.handler = Router(worker)
    fake.request('INVITE', ruri_user='alice')
    worker.async_query('callmgr', 'route.req', route_req('alice'), 'route_reply',
                       'route_timeout', timeout=5)   # a valid pair, remembered
    calls = len(fake.calls)
    fake.request('INVITE', ruri_user='bob')
    with pytest.raises(ValueError, match='method names'):
        worker.async_query('callmgr', 'route.req', route_req('bob'), on_reply, on_timeout,
                           timeout=5)
    assert fake.calls[calls:] == []


@pytest.mark.parametrize('style', ['reply_to', 'server_id'])
def test_async_query_resumes_on_reply_in_the_consumer_process(kamailio, responder, fake,
                                                              style):
    instance = kamailio()
    consumer = instance.consumer()
    router = fake.handler = Router(consumer)
    exchange, seen = responder(routed, style, on_request=lambda: {
        key: t.suspended for key, t in fake.transactions.items()})
    worker = instance.process()

    msg = fake.request('INVITE', ruri_user='alice')
    msg_id = worker.async_query(exchange, 'route.req', route_req('alice'),
                                on_reply='route_reply', on_timeout='route_timeout',
                                timeout=5)
    t = msg.transaction
    # The next SIP message of this worker: the resume must not touch it.
    other = fake.request('INVITE', ruri_user='carol')

    assert wait_for(lambda: fake.replies)
    assert fake.replies == [(302, 'Moved Temporarily', 'tm', 'sip:alice@10.0.0.9', [],
                             msg.get('$ci'), (t.index, t.label))]
    assert fake.continues == [Continue(t.index, t.label, 'kazoo_resume_route_reply', 1)]
    # tm keeps the deadline: its timer, and the failure route that resumes on_timeout,
    # both set before t_suspend makes the transaction (no t_newtran of its own).
    assert fake.calls[:3] == [('tm.t_set_fr', (5000, 5000)),
                              ('tm.t_on_failure', ('kazoo_timeout_route_timeout',)),
                              ('tmx.t_suspend', ())]
    # Resumed with both undone: a request relayed from on_reply gets the usual timers,
    # and its negative replies do not run on_timeout.
    assert ('tm.t_on_failure', ('',)) in fake.calls and ('tm.t_reset_fr', ()) in fake.calls
    assert (t.on_failure, t.fr) == ('', None)
    assert fake.errors == []
    # The transaction-local R-URI changed; the current message's did not.
    assert (msg.get('$ru'), other.get('$ru')) == ('sip:alice@10.0.0.9', 'sip:carol@127.0.0.1')
    assert fake.msg is other

    [(method, reply, error, greenlet, _)] = router.resumed
    assert (method, reply['Route'], reply['Msg-ID'], error) == \
        ('route_reply', 'sip:alice@10.0.0.9', msg_id, None)
    assert greenlet.name.startswith('kazoo_green-worker')  # a worker of the consumer
    assert consumer.reply() is None  # only set inside on_reply

    [(request, meta, suspended_then)] = seen
    assert suspended_then == {(t.index, t.label): True}  # suspended before it was sent
    assert request['Msg-ID'] == msg_id == meta.properties['correlation_id']
    assert msg_id.split(':')[:5] == ['kgasync', str(t.index), str(t.label), 'route_reply',
                                     'route_timeout']
    assert msg_id.split(':', 8)[8] == exchange
    assert request['Server-ID'] == meta.properties['reply_to'] == instance.node + '-resume'
    assert (request['App-Name'], request['Node'], request['To']) == \
        ('kamailio', instance.node, 'alice')
    assert worker.stats()['queries'] == worker.stats()['published'] == 1  # one message
    assert wait_for(lambda: consumer.stats()['queries_ok'] == 1)
    assert consumer.histograms()['query_seconds'][exchange]['count'] == 1


def test_many_async_queries_each_resume_their_own_transaction(kamailio, responder, fake):
    instance = kamailio()
    consumer = instance.consumer()
    router = fake.handler = Router(consumer)
    exchange, _ = responder(routed)
    worker = instance.process()
    users = ['u%d' % n for n in range(20)]
    msgs = {}
    for user in users:
        msgs[user] = fake.request('INVITE', ruri_user=user)
        worker.async_query(exchange, 'route.req', route_req(user), 'route_reply',
                           'route_timeout', timeout=5)
    assert wait_for(lambda: len(fake.replies) == len(users))
    for user, msg in msgs.items():
        t = msg.transaction
        assert fake.replies_to(msg.get('$ci')) == [
            (302, 'Moved Temporarily', 'tm', 'sip:%s@10.0.0.9' % user, [], msg.get('$ci'),
             (t.index, t.label))]
    assert sorted(c.method for c in fake.continues) == ['kazoo_resume_route_reply'] * len(users)
    assert all(c.result == 1 for c in fake.continues)
    assert len(router.resumed) == len(users)
    assert consumer.stats()['queries_ok'] == len(users)


def test_resume_in_consumer_false_leaves_every_resume_to_the_resumers(kamailio, responder,
                                                                      fake):
    """kazoo_consumer with resume_in_consumer=False does not read the resume queue; a
    kazoo_resumer process (on memory://, its gevent readers: the poll(2) loop needs a
    real broker, tests/integration/test_resumeloop.py) resumes every reply."""
    instance = kamailio(resume_in_consumer=False)
    consumer = instance.process()
    consumer.subscribe(unique('presence'), 'update.*', exchange_type='topic')
    instance.run(consumer.run_consumer)
    assert wait_for(lambda: consumer.stats()['consume_connected'], 5)
    resumer = instance.process()
    instance.run(resumer.run_consumer, False)
    assert wait_for(lambda: resumer.stats()['consume_connected'], 5)
    router = fake.handler = Router(resumer)
    exchange, _ = responder(routed)
    worker = instance.process()
    for n in range(10):
        fake.request('INVITE', ruri_user='u%d' % n)
        worker.async_query(exchange, 'route.req', route_req('u%d' % n), 'route_reply',
                           'route_timeout', timeout=5)
    assert wait_for(lambda: len(fake.replies) == 10)
    assert [r.code for r in fake.replies] == [302] * 10 and len(router.resumed) == 10
    assert resumer.stats()['queries_ok'] == 10
    assert consumer.stats()['queries_ok'] == 0 and not consumer._ack_windows
    assert resumer._loop is None   # memory://: no loop


def test_no_reply_resumes_on_timeout_at_the_deadline(kamailio, responder, fake):
    """tm's timer: the failure route runs on_timeout (in Kamailio, in the timer process)."""
    instance = kamailio()
    consumer = instance.consumer()
    router = fake.handler = Router(consumer)
    exchange, seen = responder(lambda request: None)  # consumes, never answers
    worker = instance.process()

    msg = fake.request('INVITE', ruri_user='alice')
    started = monotonic()
    worker.async_query(exchange, 'route.req', route_req('alice'), 'route_reply',
                       'route_timeout', timeout=0.3)
    assert wait_for(lambda: router.resumed, 5)
    [(method, reply, error, greenlet, at)] = router.resumed
    assert (method, reply, error) == ('route_timeout', None, 'timeout')
    assert at - started >= 0.28  # not before its deadline (hub timers may be a tick early)
    t = msg.transaction
    assert fake.replies == [(503, 'Service Unavailable', 'tm', 'sip:alice@127.0.0.1', [],
                             msg.get('$ci'), (t.index, t.label))]
    assert fake.continues == []   # not a resume: the transaction's own failure route
    assert t.expired
    assert len(seen) == 1
    assert consumer.stats()['queries_timeout'] == 1
    assert consumer.reply_error() is None   # only set inside on_timeout


def test_no_consumer_process_still_answers_at_the_deadline(kamailio, responder, fake):
    """Every consumer process dead or busy: tm answers through on_timeout, on time."""
    instance = kamailio()
    worker = instance.process()
    router = fake.handler = Router(worker)
    exchange, seen = responder(routed)   # answers, but nobody reads <node>-resume
    msg = fake.request('INVITE', ruri_user='alice')
    worker.async_query(exchange, 'route.req', route_req('alice'), 'route_reply',
                       'route_timeout', timeout=0.2)
    assert wait_for(lambda: router.resumed, 5)
    assert [(m, e) for m, _, e, _, _ in router.resumed] == [('route_timeout', 'timeout')]
    assert [r.code for r in fake.replies_to(msg.get('$ci'))] == [503]
    assert len(seen) == 1 and fake.continues == []


def test_on_timeout_that_replies_nothing_gets_tms_408(kamailio, fake):
    class Quiet(Router):
        def route_timeout(self, msg):
            self._record('route_timeout')
            return 1

    instance = kamailio()
    worker = instance.process()
    router = fake.handler = Quiet(worker)
    msg = fake.request('INVITE')
    fake.tm.t_newtran()
    fake.tm.t_set_fr(100, 100)
    fake.tm.t_on_failure('kazoo_timeout_route_timeout')
    fake.tmx.t_suspend()
    assert wait_for(lambda: router.resumed, 5)
    assert [r.code for r in fake.replies_to(msg.get('$ci'))] == [408]
    assert worker.stats()['queries_timeout'] == 1


def test_failure_route_of_a_method_the_handler_lacks_is_an_attribute_error(fake):
    handler = Router(kemi.Kazoo(MEM, node=unique('kamailio')))
    assert callable(handler.kazoo_timeout_route_timeout)
    with pytest.raises(AttributeError):
        handler.kazoo_timeout_no_such_method
    with pytest.raises(AttributeError):
        handler.no_such_attribute


def test_reply_after_the_deadline_is_not_resumed(kamailio, responder, fake):
    """Shed, not resumed late: tm answered it through on_timeout at the deadline."""
    instance = kamailio()
    consumer = instance.consumer()
    router = fake.handler = Router(consumer)
    answered = []

    def late(request):
        gevent.sleep(0.4)
        answered.append(monotonic())
        return routed(request)

    exchange, _ = responder(late)
    worker = instance.process()
    msg = fake.request('INVITE', ruri_user='alice')
    worker.async_query(exchange, 'route.req', route_req('alice'), 'route_reply',
                       'route_timeout', timeout=0.15)
    assert wait_for(lambda: answered, 5)
    assert wait_for(lambda: consumer.stats()['async_late'] == 1, 5)  # the late reply
    assert fake.continues == []
    assert [m for m, _, _, _, _ in router.resumed] == ['route_timeout']
    assert router.resumed[0][2] == 'timeout'
    assert [r.code for r in fake.replies_to(msg.get('$ci'))] == [503]
    stats = consumer.stats()
    assert (stats['queries_timeout'], stats['queries_ok'], stats['replies_unmatched']) == \
        (1, 0, 0)


def test_reply_resumes_in_whichever_consumer_gets_it(kamailio, fake):
    """The Msg-ID is all a consumer process needs: no notice, no state of the sender's."""
    instance = kamailio()
    consumer = instance.consumer()
    router = fake.handler = Router(consumer)
    sender = instance.process()
    msgs = {}
    for name, deadline in (('in-time', monotonic() + 30), ('too-late', monotonic() - 1)):
        msgs[name] = msg = fake.request('INVITE', ruri_user=name)
        fake.tmx.t_suspend()
        msg_id = async_id(msg.transaction, deadline)
        sender.publish('targeted', consumer.async_queue, {
            'Event-Category': 'route', 'Event-Name': 'resp', 'Msg-ID': msg_id,
            'Route': 'sip:%s@10.0.0.9' % name})
    assert wait_for(lambda: consumer.stats()['async_late'] == 1 and fake.continues)
    on_time = msgs['in-time']
    assert [r[:4] for r in fake.replies] == [(302, 'Moved Temporarily', 'tm',
                                             'sip:in-time@10.0.0.9')]
    assert fake.continues == [
        Continue(on_time.transaction.index, on_time.transaction.label, 'kazoo_resume_route_reply', 1)]
    assert [(m, e) for m, _, e, _, _ in router.resumed] == [('route_reply', None)]


def test_resumer_processes_resume_and_leave_subscriptions_alone(kamailio, responder, fake):
    """kazoo_resumer: run_consumer(subscriptions=False) reads the resume queue only."""
    instance = kamailio()
    events = []
    resumer = instance.process()
    event = unique('ev')
    resumer.subscribe(event, 'x.*', exchange_type='topic')
    resumer.event_route('kazoo:consumer-event')(lambda p, m: events.append(p))
    instance.run(resumer.run_consumer, False)
    assert wait_for(lambda: resumer.stats()['consume_connected'], 5)
    router = fake.handler = Router(resumer)
    exchange, _ = responder(routed)
    worker = instance.process()
    with pytest.raises(KazooError):   # not even its exchange was declared
        worker.publish(event, 'x.y', {'Event-Category': 'test', 'Event-Name': 'x'})
    msg = fake.request('INVITE', ruri_user='alice')
    worker.async_query(exchange, 'route.req', route_req('alice'), 'route_reply',
                       'route_timeout', timeout=5)
    assert wait_for(lambda: fake.replies)
    assert [r.code for r in fake.replies_to(msg.get('$ci'))] == [302]
    assert [m for m, _, _, _, _ in router.resumed] == ['route_reply']
    assert resumer.stats()['queries_ok'] == 1
    assert resumer.zones[resumer.zone].feeds[0].subscriber.subscriptions == []
    assert [e for e in events if e.get('Event-Category') != 'connection'] == []
    assert resumer.stats()['consumed'] == 0


def suspended_invite(kamailio, runtimes, fake):
    """A consumer process, a sender and an INVITE whose transaction is suspended; returns
    (consumer, msg, send) where ``send(**fields)`` publishes a reply for it."""
    consumer = kamailio().consumer()
    fake.handler = Router(consumer)
    sender = runtimes(MEM)
    msg = fake.request('INVITE')
    fake.tmx.t_suspend()
    msg_id = async_id(msg.transaction, monotonic() + 30)

    def send(**fields):
        sender.publish('targeted', consumer.async_queue, dict(
            {'Event-Category': 'route', 'Event-Name': 'resp', 'Msg-ID': msg_id}, **fields))
    return consumer, msg, send


def test_a_second_reply_is_dropped(kamailio, runtimes, fake):
    consumer, _, send = suspended_invite(kamailio, runtimes, fake)
    for n in range(2):
        send(n=n)
    assert wait_for(lambda: consumer.stats()['replies_unmatched'] == 1)
    gevent.sleep(0.05)
    assert [c.method for c in fake.continues] == ['kazoo_resume_route_reply']
    assert fake.handler.resumed[0][1]['n'] == 0


def test_a_reply_for_a_transaction_no_longer_suspended_is_unmatched_not_ok(kamailio, runtimes,
                                                                          fake):
    """A copy redelivered after another process resumed it (and lost its connection before
    the ack), or one that raced tm's deadline: t_continue refuses it."""
    consumer, msg, send = suspended_invite(kamailio, runtimes, fake)
    msg.transaction.suspended = False   # resumed by another process meanwhile
    send()
    assert wait_for(lambda: consumer.stats()['replies_unmatched'] == 1)
    assert [c.result for c in fake.continues] == [-1]
    assert consumer.stats()['queries_ok'] == 0 and fake.handler.resumed == []


def test_consumer_survives_bad_messages_on_the_async_queue(kamailio, responder, fake):
    instance = kamailio()
    consumer = instance.consumer()
    fake.handler = Router(consumer)
    queue = consumer.async_queue
    put_on_queue(queue, b'not json')
    put_on_queue(queue, b'{"Msg-ID": "not-an-async-id"}')
    put_on_queue(queue, b'{"Msg-ID": "kgasync:1:2:only:five"}')
    put_on_queue(queue, b'{"Msg-ID": "kgasync:1:2:a:b:c:d:e:f"}')   # numbers that are not
    put_on_queue(queue, b'{"Msg-ID": "kgasync:1:2:a:b:99999:1:x"}')  # an older format
    # Well-formed but naming what is no handler method (``_VALID_PAIRS`` holds only
    # pairs that were checked).
    put_on_queue(queue, b'{"Msg-ID": "kgasync:1:2:on-reply:b:9999999999999:1:x:ex"}')
    assert wait_for(lambda: consumer.stats()['replies_unmatched'] == 5)
    assert consumer.stats()['bad_input'] == 1
    # Still consuming, and nothing was resumed by the garbage.
    exchange, _ = responder(routed)
    fake.request('INVITE', ruri_user='alice')
    instance.process().async_query(exchange, 'route.req', route_req('alice'),
                                   'route_reply', 'route_timeout', timeout=5)
    assert wait_for(lambda: fake.replies)
    assert [c.method for c in fake.continues] == ['kazoo_resume_route_reply']


# -- failures in the SIP worker ----------------------------------------------------------

def test_request_not_sent_resumes_on_timeout_at_once_in_the_caller(kamailio, fake):
    instance = kamailio()
    worker = instance.process()
    router = fake.handler = Router(worker)  # the resume happens in this process
    msg = fake.request('INVITE', ruri_user='alice')
    msg_id = worker.async_query(unique('missing'), 'route.req', route_req('alice'),
                                'route_reply', 'route_timeout', timeout=5)
    assert msg_id.startswith('kgasync:')
    # Synchronously: no waiting, no consumer involved.
    [(method, reply, error, greenlet, _)] = router.resumed
    assert (method, reply) == ('route_timeout', None)
    assert error.startswith('not sent: ') and 'does not exist' in error
    assert greenlet is gevent.getcurrent()
    t = msg.transaction
    assert fake.continues == [Continue(t.index, t.label, 'kazoo_resume_route_timeout', 1)]
    assert fake.replies == [(503, 'Service Unavailable', 'tm', 'sip:alice@127.0.0.1', [],
                             msg.get('$ci'), (t.index, t.label))]
    assert worker.reply_error() is None  # only set inside on_timeout
    assert worker.stats()['queries_failed'] == 1
    assert any('not sent' in line for line in fake.log_lines('warn'))  # via KSR.warn


def test_request_not_sent_is_not_resumed_again_by_the_consumer(kamailio, fake):
    instance = kamailio()
    consumer = instance.consumer()
    worker = instance.process()
    fake.handler = Router(worker)
    msg = fake.request('INVITE')
    worker.async_query(unique('missing'), 'route.req', route_req('alice'), 'route_reply',
                       'route_timeout', timeout=0.1)
    gevent.sleep(0.4)  # past the deadline tm's timer had
    t = msg.transaction
    assert fake.continues == [Continue(t.index, t.label, 'kazoo_resume_route_timeout', 1)]
    assert [r.code for r in fake.replies] == [503] and not t.expired
    assert consumer.stats()['queries_timeout'] == worker.stats()['queries_timeout'] == 0


BAD_NAMES = ['', None, 'route reply', 'route.reply', 'route:reply', '1route', 'x' * 65,
             'route-reply', 'route_reply()']


@pytest.mark.parametrize('bad', BAD_NAMES + ['route_reply\n'])
def test_bad_method_names_raise_before_anything_is_suspended(kamailio, fake, bad):
    worker = kamailio().process()
    fake.handler = Router(worker)
    fake.request('INVITE')
    for names in ((bad, 'route_timeout'), ('route_reply', bad)):
        with pytest.raises(ValueError):
            worker.async_query('callmgr', 'route.req', route_req('alice'), *names)
    assert (fake.calls, fake.transactions, fake.continues) == ([], {}, [])
    assert worker.stats()['published'] == 0 and not worker.connected


@pytest.mark.parametrize('failing', ['tm.t_set_fr', 'tm.t_on_failure', 'tmx.t_suspend'])
def test_transaction_that_cannot_be_suspended_raises_and_sends_nothing(kamailio, fake,
                                                                       failing):
    worker = kamailio().process()
    fake.handler = Router(worker)
    fake.results[failing] = -1
    fake.request('INVITE')
    with pytest.raises(KazooError):
        worker.async_query('callmgr', 'route.req', route_req('alice'), 'route_reply',
                           'route_timeout')
    assert fake.calls[-1][0] == failing
    assert fake.continues == [] and fake.replies == []
    assert worker.stats()['published'] == 0 and not worker.connected


# -- fork handling and logging ------------------------------------------------------------

def test_child_init_reinits_gevent_and_forgets_inherited_state(fake, monkeypatch):
    kz = kemi.Kazoo(MEM, node=unique('kamailio'))
    handler = kemi.Handler(kz)  # mod_init: no I/O
    assert not kz.connected and kz.stats()['connects'] == 0
    assert kz.async_queue == kz.node + '-resume'
    assert kz.app_name == 'kamailio'
    reinits = []
    monkeypatch.setattr(gevent, 'reinit', lambda *a, **k: reinits.append(a))
    kz._mark_done('y', monotonic())
    assert handler.child_init(-1) == 0   # a timer process: connects when it needs to
    assert reinits == [()] and not kz.connected
    assert (kz._async_done, len(kz._async_done_order)) == (set(), 0)
    assert handler.child_init(3) == 0    # a SIP worker: connected before its first call
    assert kz.connected and kz.stats()['connects'] == 1
    kz.stop()


def test_child_init_of_a_sip_worker_without_a_broker_logs_and_starts(fake, kz_logger):
    kz = kemi.Kazoo('amqp://guest:guest@127.0.0.1:1//', node=unique('kamailio'),
                    connect_timeout=0.2)
    handler = kemi.Handler(kz)
    started = monotonic()
    assert handler.child_init(1) == 0
    assert monotonic() - started < 5 and not kz.connected
    assert any('no broker at start' in line for line in fake.log_lines('warn'))


def test_use_kamailio_log_routes_records_by_level(fake, kz_logger):
    assert kemi.use_kamailio_log(logging.DEBUG) is True
    assert kemi.use_kamailio_log(logging.DEBUG) is True
    assert sum(isinstance(h, kemi.KSRLogHandler) for h in kz_logger.handlers) == 1
    assert kz_logger.propagate is False
    kz_logger.error('e %d', 1)
    kz_logger.warning('w')
    kz_logger.info('i')
    kz_logger.debug('d')
    logging.getLogger('kazoo_green.sub').critical('c')
    assert fake.logs == [('err', 'kazoo_green: e 1\n'), ('warn', 'kazoo_green: w\n'),
                         ('info', 'kazoo_green: i\n'), ('dbg', 'kazoo_green: d\n'),
                         ('err', 'kazoo_green: c\n')]

    def broken(text):
        raise RuntimeError('Kamailio log failed')
    fake.err = broken
    kz_logger.error('must not raise')  # logging never breaks routing


def test_use_kamailio_log_outside_kamailio_changes_nothing(kz_logger, monkeypatch):
    monkeypatch.setitem(sys.modules, 'KSR', None)  # `import KSR` raises ImportError
    before = list(kz_logger.handlers), kz_logger.level, kz_logger.propagate
    assert kemi.use_kamailio_log() is False
    assert (list(kz_logger.handlers), kz_logger.level, kz_logger.propagate) == before


# -- the example script --------------------------------------------------------------------

def load_router(monkeypatch):
    """examples/kamailio/router.py as Kamailio loads it, on memory://, a fresh module."""
    monkeypatch.setattr(sys, 'path', list(sys.path))  # it adds the venv and the project
    monkeypatch.setenv('KAZOO_GREEN_BROKERS', MEM)
    monkeypatch.setenv('KAZOO_GREEN_NODE', unique('kamailio') + '@test')
    monkeypatch.setenv('KAZOO_GREEN_QUERY_TIMEOUT', '0.5')
    path = os.path.join(ROOT, 'examples', 'kamailio', 'router.py')
    spec = importlib.util.spec_from_file_location(unique('router').replace('-', '_'), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_router_script(kamailio, runtimes, fake, monkeypatch):
    router = load_router(monkeypatch)
    instance = kamailio()
    instance.processes.append(router.kz)  # stopped at the end
    handler = fake.handler = router.mod_init()
    # The example resumes in kazoo_resumer processes; this one process stands for the
    # consumer and the resumers.
    assert router.kz.resume_in_consumer is False
    router.kz.resume_in_consumer = True
    instance.run(handler.kazoo_consumer, None)  # the rtimer process, sharing kz here
    assert wait_for(lambda: router.kz.stats()['consume_connected'], 5)
    assert any('consumer process' in line for line in fake.log_lines('info'))

    services = runtimes(MEM, app_name='services')
    registrations = []

    @services.event_route('kazoo:consumer-event-route-req')
    def route(request, meta):
        if request['To'] != 'async-silent':
            known = not request['To'].startswith('unknown')
            services.respond(request, routed(request) if known else {}, meta)

    @services.event_route('kazoo:consumer-event-directory-reg-success')
    def registered(payload, meta):
        registrations.append((meta.routing_key, payload['Username'], payload['Contact']))

    services.subscribe('callmgr', 'route.req', exchange_type='topic', queue=unique('q'))
    services.subscribe('registrar', 'registration.success.#', exchange_type='topic',
                       queue=unique('q'))
    services.start()
    assert services.wait_connected(5)

    def sip(method, user, **kwargs):
        msg = fake.request(method, ruri_user=user, **kwargs)
        assert handler.ksr_request_route(msg) == 1
        return msg

    # (sl or tm for the sync replies: the script's choice, not checked here)
    msg = sip('INVITE', 'alice')  # sync query in the SIP worker
    assert [(r.code, r.reason, r.ruri) for r in fake.replies_to(msg.get('$ci'))] == [
        (302, 'Moved Temporarily', 'sip:alice@10.0.0.9')]
    msg = sip('INVITE', 'unknown-bob')
    assert [r[:2] for r in fake.replies_to(msg.get('$ci'))] == [(404, 'Not Found')]
    msg = sip('INVITE', 'async-carol')  # suspended, resumed by the consumer
    assert fake.replies_to(msg.get('$ci')) == []
    assert wait_for(lambda: fake.replies_to(msg.get('$ci')))
    t = msg.transaction
    assert fake.replies_to(msg.get('$ci')) == [
        (302, 'Moved Temporarily', 'tm', 'sip:async-carol@10.0.0.9', [], msg.get('$ci'),
         (t.index, t.label))]
    msg = sip('INVITE', 'async-silent')
    assert wait_for(lambda: fake.replies_to(msg.get('$ci')), 5)
    assert [r[:3] for r in fake.replies_to(msg.get('$ci'))] == \
        [(503, 'Service Unavailable', 'tm')]
    msg = sip('REGISTER', None, to_user='dave', to_domain='example.com',
              contact='<sip:dave@10.1.1.1:5060>')
    assert [r[:2] for r in fake.replies_to(msg.get('$ci'))] == [(200, 'OK')]
    assert wait_for(lambda: registrations) == [
        ('registration.success.example%2Ecom.dave', 'dave', '<sip:dave@10.1.1.1:5060>')]
    msg = sip('OPTIONS', 'alice')
    assert [r[:2] for r in fake.replies_to(msg.get('$ci'))] == [(501, 'Not Implemented')]

    services.publish('presence', 'update.alice.x', {
        'Event-Category': 'presence', 'Event-Name': 'update', 'From': 'alice',
        'State': 'busy'})
    assert wait_for(lambda: fake.htables.get('presence', {}).get('alice')) == 'busy'
    # async-carol resumed; async-silent answered by tm's timer (its failure route)
    assert len(fake.continues) == 1 and fake.continues[0].result == 1
    assert fake.errors == []
    assert isinstance(router.kz, kemi.Kazoo) and isinstance(router.kz, kazoo_green.Kazoo)


def test_resumed_ids_are_forgotten_after_their_ttl():
    kz = kemi.Kazoo(MEM, node=unique('kamailio'))
    now = 1000.0
    for i in range(50000):
        kz._mark_done('id%d' % i, now)
    assert len(kz._async_done) == 50000
    kz._mark_done('fresh', now + kemi._DONE_TTL + 1)
    assert kz._async_done == {'fresh'} and len(kz._async_done_order) == 1


# -- Kamailio's statistics (kazoo_green._kamstats) -----------------------------------------
# One FakeKSR stands for every process of the simulated instance: its counter_values are
# what Kamailio would sum. The pusher (a consumer process) pushes on tick(), as its loop
# does every PUSH_INTERVAL; the tests call it rather than wait.

from kazoo_green import _kamstats  # noqa: E402


def counter(fake, name):
    return fake.counter_values.get('kazoo_green.' + name, 0)


def summed(runtimes, name):
    return sum(kz.stats()[name] for kz in runtimes)


def pusher_and_worker(kamailio, responder):
    """A responder's exchange, a consumer process (the pusher) and a SIP worker."""
    exchange, _ = responder(routed)
    instance = kamailio()
    consumer = instance.consumer()
    return exchange, consumer, instance.process()


def test_the_shipped_include_is_what_kamailio_cfg_prints():
    path = os.path.join(ROOT, 'examples', 'kamailio', 'kazoo_green_stats.cfg')
    with open(path) as f:
        assert f.read() == _kamstats.include_cfg(), 'run: kazoo-green kamailio-cfg > ' + path
    text = _kamstats.include_cfg()
    for name in _kamstats.NAMES:   # each declared once, in the group, described
        assert text.count('"kazoo_green.%s:' % name) == 1, name
    assert len(set(_kamstats.NAMES)) == len(_kamstats.NAMES)


def test_sip_worker_counts_reach_kamailio_through_the_pusher(kamailio, responder, fake):
    fake.declare_kazoo_green_stats()
    exchange, consumer, worker = pusher_and_worker(kamailio, responder)
    for n in range(3):
        fake.request('INVITE', ruri_user='u%d' % n)
        assert worker.query(exchange, 'route.req', route_req('u%d' % n), timeout=5)['Route']
    consumer.kamailio_stats.tick()
    both = (worker, consumer)
    for name in ('queries', 'queries_ok', 'published', 'connects'):
        assert counter(fake, name) == summed(both, name) > 0, name
    assert counter(fake, 'queries') == 3
    assert counter(fake, 'links_up') == 3 and counter(fake, 'links_down') == 0
    assert counter(fake, 'pending_queries') == 0
    seen = fake.observations['kazoo_green_query_seconds']
    assert len(seen) == 3 and {label for _, label in seen} == {exchange}
    assert all(0 < value < 5 for value, _ in seen)
    # Replayed: each bucket's observations as their mean, so the sum is exact.
    h = worker.histograms()['query_seconds'][exchange]
    assert abs(sum(value for value, _ in seen) - h['sum']) < 1e-5
    # A failing query, then a push: counted once, nothing pushed twice.
    with pytest.raises(KazooError):
        worker.query('no-such-exchange', 'x', route_req('x'), timeout=1)
    consumer.kamailio_stats.tick()
    consumer.kamailio_stats.tick()
    assert counter(fake, 'queries_failed') == worker.stats()['queries_failed'] == 1
    assert counter(fake, 'queries') == 4
    assert len(fake.observations['kazoo_green_query_seconds']) == 3
    assert fake.log_lines('err') == []


def test_consumer_process_counts_handler_latency_and_its_links(kamailio, fake):
    fake.declare_kazoo_green_stats()
    instance = kamailio()
    consumer = instance.process()
    exchange = unique('presence')
    handled = []
    consumer.add_route('kazoo:consumer-event-presence-update',
                       lambda payload, meta: handled.append(payload))
    consumer.subscribe(exchange, 'update.*', exchange_type='topic', queue=unique('q'))
    instance.run(consumer.run_consumer)
    assert wait_for(lambda: consumer.stats()['consume_connected'], 5)
    publisher = instance.process()
    for n in range(2):
        publisher.publish(exchange, 'update.x', {'Event-Category': 'presence',
                                                 'Event-Name': 'update', 'N': n})
    assert wait_for(lambda: len(handled) == 2, 5)
    assert wait_for(lambda: consumer.stats()['acked'] == 2, 5)
    consumer.kamailio_stats.tick()
    assert counter(fake, 'consumed') == 2 and counter(fake, 'acked') == 2
    assert counter(fake, 'links_up') == 3 and counter(fake, 'links_down') == 0
    seen = fake.observations['kazoo_green_handler_seconds']
    assert [label for _, label in seen] == ['kazoo:consumer-event-presence-update'] * 2
    # Stopping a runtime takes its gauges out of the sums; its counts stay.
    publisher.stop()
    consumer.kamailio_stats.tick()
    assert counter(fake, 'links_up') == 2 and counter(fake, 'consumed') == 2


def test_nothing_is_pushed_where_kamailio_cfg_declares_nothing(kamailio, responder, fake,
                                                               kz_logger):
    exchange, consumer, worker = pusher_and_worker(kamailio, responder)
    worker.query(exchange, 'route.req', route_req('a'), timeout=5)
    consumer.kamailio_stats.tick()
    assert fake.counter_values == {} and fake.observations == {}
    assert fake.log_lines() == []   # statistics not configured: nothing to say


def test_a_stale_include_is_named_once_and_not_used(kamailio, responder, fake, kz_logger):
    fake.declare_kazoo_green_stats()
    fake.defines[_kamstats.STATS_DEFINE] = '"0123456789ab"'   # another kazoo_green's
    kemi.use_kamailio_log()
    exchange, consumer, worker = pusher_and_worker(kamailio, responder)
    for _ in range(2):
        worker.query(exchange, 'route.req', route_req('a'), timeout=5)
    consumer.kamailio_stats.tick()
    assert fake.counter_values == {}
    warned = [t for t in fake.log_lines('warn') if 'kamailio-cfg' in t]
    assert len(warned) == 2 and 'another kazoo_green version' in warned[0]   # one each


def test_counters_only_without_histograms(kamailio, responder, fake):
    fake.declare_kazoo_green_stats(histograms=False)
    exchange, consumer, worker = pusher_and_worker(kamailio, responder)
    worker.query(exchange, 'route.req', route_req('a'), timeout=5)
    consumer.kamailio_stats.tick()
    assert counter(fake, 'queries_ok') == 1
    assert fake.observations == {}


def test_after_the_fork_a_child_counts_only_its_own_share(kamailio, responder, fake):
    fake.declare_kazoo_green_stats()
    exchange, consumer, worker = pusher_and_worker(kamailio, responder)
    worker.query(exchange, 'route.req', route_req('a'), timeout=5)
    consumer.kamailio_stats.tick()
    assert counter(fake, 'queries') == 1
    # A forked child starts from what the parent counted: counting it again would count
    # the parent's work twice.
    worker.after_fork()
    worker.query(exchange, 'route.req', route_req('b'), timeout=5)
    consumer.kamailio_stats.tick()
    assert counter(fake, 'queries') == 2


def test_the_table_is_shared_with_forked_children_and_summed_once():
    """The real thing underneath: slots written by forked processes, summed by one."""
    table = _kamstats.Table(slots=4)
    values = [0] * len(_kamstats.NAMES)
    pids = []
    for n in (1, 2, 3):
        pid = os.fork()
        if pid == 0:   # a child writes its slot and leaves at once
            code = 1
            try:
                slot = table.claim(token=n)
                row = list(values)
                row[_kamstats.NAMES.index('queries')] = n * 100
                row[_kamstats.NAMES.index('links_up')] = 1
                table.write(slot, row)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids)
    totals, pushed = table.totals()
    assert totals[_kamstats.NAMES.index('queries')] == 600
    assert totals[_kamstats.NAMES.index('links_up')] == 3
    assert pushed == [0] * len(values)
    assert table.claim(token=9) is not None and table.claim(token=10) is None   # 4 slots


def test_replies_resumed_late_make_new_async_queries_refused_at_once(kamailio, responder,
                                                                      fake):
    """Admission: a standing lag in the resumes sheds new async queries (Overloaded,
    before any transaction or message), and quiet lets them in again."""
    instance = kamailio(shed_lag=0.05)
    consumer = instance.consumer()
    router = fake.handler = Router(consumer)
    exchange, seen = responder(lambda request: (gevent.sleep(0.15), routed(request))[1])
    worker = instance.process()
    # In Kamailio both are forks of one mod_init object: one shared mapping.
    worker._admission = admission = consumer._admission
    for user in ('a1', 'a2', 'a3'):
        fake.request('INVITE', ruri_user=user)
        worker.async_query(exchange, 'route.req', route_req(user), 'route_reply',
                           'route_timeout', timeout=5)
    assert wait_for(lambda: len(router.resumed) == 3, 5)   # late, but all resumed
    assert wait_for(lambda: admission.share > 0, 5)        # the consumer's loop moved it
    while admission.share < 1.0:                           # as a long overload would
        admission.observe(1.0)
        admission.update()
    calls, published = len(fake.calls), worker.stats()['published']
    fake.request('INVITE', ruri_user='shed')
    with pytest.raises(kazoo_green.Overloaded):
        worker.async_query(exchange, 'route.req', route_req('shed'), 'route_reply',
                           'route_timeout', timeout=5)
    assert not [c for c in fake.calls[calls:] if c[0].startswith(('tm.', 'tmx.'))]
    assert worker.stats()['published'] == published and len(seen) == 3
    assert worker.stats()['async_shed'] == 1 and worker.stats()['queries'] == 3
    # No replies any more (everything shed): the share comes down by itself.
    assert wait_for(lambda: admission.share == 0.0, 10)
    fake.request('INVITE', ruri_user='again')
    worker.async_query(exchange, 'route.req', route_req('again'), 'route_reply',
                       'route_timeout', timeout=5)
    assert wait_for(lambda: len(router.resumed) == 4, 5)


@pytest.mark.parametrize('resume_in_consumer', [True, False])
def test_only_a_resuming_process_moves_the_shed_share(kamailio, resume_in_consumer):
    """A kazoo_consumer that resumes nothing (resume_in_consumer=False) observes no lag:
    were it to update the shared share, each of its intervals without a reply would
    pull down what the resumers raise. Counted over two statistics pushes (PUSH_INTERVAL,
    ten admission intervals)."""
    instance = kamailio(shed_lag=0.05, resume_in_consumer=resume_in_consumer)
    consumer = instance.process()
    consumer.subscribe(unique('presence'), 'update.*', exchange_type='topic')
    admission, stats = consumer._admission, consumer.kamailio_stats
    updates, ticks = [], []
    update, tick = admission.update, stats.tick
    admission.update = lambda: (updates.append(1), update())[1]
    stats.tick = lambda: (ticks.append(1), tick())[1]
    instance.run(consumer.run_consumer)
    assert wait_for(lambda: len(ticks) >= 2, 10)
    assert bool(updates) is resume_in_consumer, len(updates)


def test_shed_lag_none_never_refuses(kamailio, fake):
    worker = kamailio(shed_lag=None).process()
    assert worker._admission is None
