"""A ``kazoo_resumer`` process's loop (kazoo_green._resumeloop) against the real RabbitMQ.

The resumer runs ``run_consumer(subscriptions=False)`` in a greenlet of this process,
with a fake KSR; the SIP worker is a blocking ``kemi.Kazoo`` called from the test; the
responder is a process of its own (the loop blocks this one in poll(2) for up to
``POLL_CAP`` at a time). What Kamailio itself does with it is in tests/e2e.
"""

import contextlib
import logging

import gevent
import gevent.event
import pytest

from kazoo_green import _resumeloop, kemi
from kazoo_green.testing import fake_ksr

from ..conftest import RABBIT_URL, close_connections, queue_counts, unique, wait_for
from . import responders


class Router(kemi.Handler):
    def route_reply(self, msg):
        import KSR
        KSR.pv.sets('$ru', 'sip:%s@10.0.0.9' % self.kz.reply()['Answer'])
        KSR.tm.t_reply(302, 'Moved Temporarily')
        return 1

    def route_timeout(self, msg):
        import KSR
        KSR.tm.t_reply(503, 'Service Unavailable')
        return 1


@pytest.fixture
def fake():
    """A FakeKSR as ``KSR``; the ``kazoo_green`` logger (kemi.Handler sends it to
    Kamailio's log) restored after the test."""
    logger = logging.getLogger('kazoo_green')
    saved = list(logger.handlers), logger.level, logger.propagate
    try:
        with fake_ksr() as fake:
            yield fake
        assert fake.errors == [], fake.log_lines('err')
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]


@pytest.fixture
def instance(fake):
    """(resumer, worker, exchange): one Kamailio instance's resuming process, running,
    and a SIP worker; a responder answers route.req on ``exchange``."""
    exchange = unique('callmgr')
    responder = responders.spawn(exchange, 'kazoo', 0.0)
    try:
        with running(fake) as (resumer, worker):
            yield resumer, worker, exchange
    finally:
        responder.kill()
        responder.wait()


@contextlib.contextmanager
def running(fake):
    """(resumer, worker): one Kamailio instance's resuming process, running in a
    greenlet, and a SIP worker; both stopped afterwards."""
    node = unique('kamailio') + '@test'
    resumer = kemi.Kazoo(RABBIT_URL, node=node, heartbeat=2, resume_in_consumer=False)
    fake.handler = Router(resumer)
    loop = gevent.spawn(resumer.run_consumer, False)
    link = resumer._sub_link
    assert wait_for(lambda: resumer._loop is not None and link.connected
                    and link in resumer._ack_windows, 10)
    worker = kemi.Kazoo(RABBIT_URL, node=node)
    try:
        yield resumer, worker
    finally:
        resumer._loop.stop()
        loop.join(timeout=2)
        loop.kill()
        for kz in (worker, resumer):
            kz.stop(timeout=2)


def ask(fake, worker, exchange, user, timeout=5):
    msg = fake.request('INVITE', ruri_user=user)
    worker.async_query(exchange, 'route.req',
                       {'Event-Category': 'route', 'Event-Name': 'req', 'To': user},
                       on_reply='route_reply', on_timeout='route_timeout', timeout=timeout)
    return msg


def codes(fake, msg):
    return [r.code for r in fake.replies_to(msg.get('$ci'))]


def test_resumes_inline_in_the_loop_with_heartbeats_and_batched_acks(fake, instance):
    resumer, worker, exchange = instance
    link = resumer._sub_link
    # Driven by the loop: no Reader greenlet, a FastPath waiting in poll(2), and
    # heartbeats negotiated all the same (Link.keepalive).
    assert link._reader is None and link.fast.blocking and link._raw.heartbeat == 2
    msgs = [ask(fake, worker, exchange, 'u%d' % i) for i in range(40)]
    assert wait_for(lambda: len(fake.replies) == 40, 20)
    for i, msg in enumerate(msgs):
        assert msg.get('$ru') == 'sip:u%d@10.0.0.9' % i and codes(fake, msg) == [302]
    assert all(c.method == 'kazoo_resume_route_reply' and c.result == 1
               for c in fake.continues)
    # Resumed in the loop's own greenlet, not through the dispatcher's workers.
    assert resumer.dispatcher.idle() and resumer.stats()['queries_ok'] == 40
    # 40 done: two full windows acked at once, the rest within ACK_DELAY.
    queue = resumer.async_queue
    assert wait_for(lambda: queue_counts(queue) == (0, 0), 10), queue_counts(queue)
    window = resumer._ack_windows[link]
    assert window.pending == 0 and window.due is None


def test_other_greenlets_run_while_the_loop_waits(instance):
    """The loop sleeps in the real poll(2), never longer than POLL_CAP, then lets the hub
    run: a greenlet spawned meanwhile runs, a timer fires."""
    ran = gevent.spawn(lambda: 'ran')
    assert ran.get(timeout=5 * _resumeloop.POLL_CAP + 1) == 'ran'
    fired = gevent.event.Event()
    gevent.spawn_later(0.05, fired.set)
    assert fired.wait(5)


def test_a_connection_closed_by_the_broker_is_made_again_and_resumes_go_on(fake, instance):
    resumer, worker, exchange = instance
    link = resumer._sub_link
    first = ask(fake, worker, exchange, 'before')
    assert wait_for(lambda: codes(fake, first) == [302], 10)
    generation = link.generation
    assert close_connections('%s consume' % resumer.node) == 1
    assert wait_for(lambda: link.connected and link.generation > generation + 1, 15)
    assert resumer.stats()['reconnects'] == 1 and link._reader is None
    later = ask(fake, worker, exchange, 'after')
    assert wait_for(lambda: codes(fake, later) == [302], 10)
    assert later.get('$ru') == 'sip:after@10.0.0.9'


def test_bad_input_on_the_resume_queue_is_counted_acked_and_the_loop_goes_on(fake,
                                                                             instance):
    resumer, worker, exchange = instance
    worker._publisher.publish('targeted', resumer.async_queue, b'{not json')
    worker._publisher.publish('targeted', resumer.async_queue, b'{"Msg-ID": "nope"}')
    assert wait_for(lambda: resumer.stats()['bad_input'] == 1
                    and resumer.stats()['replies_unmatched'] == 1, 10), resumer.stats()
    msg = ask(fake, worker, exchange, 'still')
    assert wait_for(lambda: codes(fake, msg) == [302], 10)
    assert wait_for(lambda: queue_counts(resumer.async_queue) == (0, 0), 10)


@pytest.fixture
def declared(fake):
    """kazoo_green's statistics declared in the (fake) kamailio.cfg."""
    fake.declare_kazoo_green_stats()


def test_sip_worker_lane_stores_only_the_counters_it_changed_and_kamailio_sums_right(
        fake, declared, instance):
    """An async query sent on the lane stores queries and published alone, a sync query
    whose lane read only its reply stores those and queries_ok (kemi's ``_SENT``,
    ``_ASKED``); what Kamailio's counters get is still every process's whole count."""
    from kazoo_green import _kamstats
    resumer, worker, exchange = instance
    assert resumer.kamailio_stats.slot is not None
    msgs = [ask(fake, worker, exchange, 'a%d' % i) for i in range(5)]
    for i in range(7):
        fake.request('INVITE', ruri_user='s%d' % i)
        assert worker.query(exchange, 'route.req', {
            'Event-Category': 'route', 'Event-Name': 'req', 'To': 's%d' % i})['Answer'] == \
            's%d' % i
        assert worker._stats.clean_ask, 'the sync query did not take the lane'
    assert wait_for(lambda: all(codes(fake, m) == [302] for m in msgs), 10)
    assert wait_for(lambda: resumer.stats()['queries_ok'] == 5, 5)
    # Written narrowly: the worker's slot holds exactly its own counts.
    table, at = worker.kamailio_stats.table, worker.kamailio_stats._at
    stored = _kamstats._COUNTS.unpack_from(table.mm, at)
    assert dict(zip(_kamstats.COUNTERS, stored)) == worker._stats.as_dict()
    resumer.kamailio_stats.write(full=True)
    resumer.kamailio_stats.tick()
    both = (worker, resumer)
    for name in ('queries', 'published', 'queries_ok', 'connects'):
        assert fake.counter_values.get('kazoo_green.' + name, 0) == \
            sum(kz.stats()[name] for kz in both), name
    assert fake.counter_values['kazoo_green.queries'] == 12
    assert fake.counter_values['kazoo_green.queries_ok'] == 12


@pytest.fixture
def alone(fake):
    """(resumer, worker, answer): a resuming process and a SIP worker whose async queries
    go to an exchange nobody consumes (``worker.silent``);
    ``answer(msg_id, body=None, **properties)`` publishes a reply to the resume queue
    as kazoo_green's ``Kazoo.respond`` does (no ``properties``), else with py-amqp and
    exactly those properties."""
    import amqp
    import types
    with running(fake) as (resumer, worker):
        plain = amqp.Connection('127.0.0.1:5672')
        plain.connect()
        channel = plain.channel()
        worker.silent = unique('nobody')
        channel.exchange_declare(worker.silent, 'topic', auto_delete=False)

        def answer(msg_id, body=None, **properties):
            if not properties and body is None:
                meta = types.SimpleNamespace(zone=None, via=None, properties={
                    'reply_to': resumer.async_queue, 'correlation_id': msg_id})
                worker.respond({'Msg-ID': msg_id}, {'Answer': 'kg'}, meta)
                return
            channel.basic_publish(amqp.Message(body, **properties), exchange='',
                                  routing_key=resumer.async_queue)
        try:
            yield resumer, worker, answer
        finally:
            channel.exchange_delete(worker.silent)
            plain.close()


def suspend(fake, worker, user):
    """An async query nobody answers (no responder): (its request, its Msg-ID)."""
    msg = fake.request('INVITE', ruri_user=user)
    msg_id = worker.async_query(worker.silent, 'route.req', {'To': user},
                                on_reply='route_reply', on_timeout='route_timeout',
                                timeout=10)
    return msg, msg_id


def test_whole_replies_go_down_the_lane_and_the_books_are_kept_by_a_chore(
        fake, alone, monkeypatch):
    """A reply as kazoo_green sends one (JSON, UTF-8, a correlation id) and one with
    other properties both resume straight from the read (no ``Delivered``, no consumer
    callback); the latency histogram, the admission's lag and the expiry of resumed
    Msg-IDs are done by the loop's chore afterwards."""
    resumer, worker, answer = alone
    monkeypatch.setattr(kemi, '_DONE_TTL', 0.0)
    via_callback = []
    monkeypatch.setattr(resumer, '_on_async_message', lambda *a: via_callback.append(a))
    first, first_id = suspend(fake, worker, 'lane')
    other, other_id = suspend(fake, worker, 'props')
    answer(first_id)
    answer(other_id, b'{"Answer": "other"}', correlation_id=other_id, priority=3,
           application_headers={'x': 1})
    assert wait_for(lambda: codes(fake, first) == [302] and codes(fake, other) == [302], 10)
    assert first.get('$ru') == 'sip:kg@10.0.0.9' and other.get('$ru') == 'sip:other@10.0.0.9'
    assert via_callback == []
    histogram = resumer._stats.query_seconds
    assert wait_for(lambda: sum(h.count for h in histogram.values()) == 2, 5), histogram
    assert wait_for(lambda: not resumer._async_done and not resumer._lags, 5)
    assert resumer.stats()['queries_ok'] == 2
    assert wait_for(lambda: queue_counts(resumer.async_queue) == (0, 0), 10)


def test_a_second_copy_of_a_reply_is_unmatched_and_resumes_nothing(fake, alone):
    resumer, worker, answer = alone
    msg, msg_id = suspend(fake, worker, 'twice')
    answer(msg_id)
    answer(msg_id)
    assert wait_for(lambda: resumer.stats()['replies_unmatched'] == 1, 10), resumer.stats()
    assert codes(fake, msg) == [302] and len(fake.continues) == 1
    assert resumer.stats()['queries_ok'] == 1


def test_a_reply_whose_properties_cannot_be_read_is_bad_input_acked_and_not_resumed(
        fake, alone):
    """A correlation id that is not UTF-8: counted as bad input, acked, and the
    transaction left to its deadline; the next reply resumes."""
    resumer, worker, answer = alone
    msg, msg_id = suspend(fake, worker, 'broken')
    answer(msg_id, b'{"Answer": "x"}', content_type='application/json',
           content_encoding='utf-8', correlation_id=b'\xff' + msg_id.encode())
    assert wait_for(lambda: resumer.stats()['bad_input'] == 1, 10), resumer.stats()
    assert codes(fake, msg) == [] and fake.continues == []
    later, later_id = suspend(fake, worker, 'later')
    answer(later_id)
    assert wait_for(lambda: codes(fake, later) == [302], 10)
    assert wait_for(lambda: queue_counts(resumer.async_queue) == (0, 0), 10)


def test_a_reply_bigger_than_a_read_and_a_frame_resumes_too(fake, alone):
    """200 kB of body: more than one read of the socket (64 kB) and more than one body
    frame (the broker's frame_max, 128 kB): assembled frame by frame, then resumed."""
    resumer, worker, answer = alone
    msg, msg_id = suspend(fake, worker, 'big')
    body = ('{"Answer": "big", "Pad": "%s"}' % ('x' * 200000)).encode()
    answer(msg_id, body, correlation_id=msg_id)
    assert wait_for(lambda: codes(fake, msg) == [302], 10)
    assert msg.get('$ru') == 'sip:big@10.0.0.9'
    small, small_id = suspend(fake, worker, 'small')
    answer(small_id)
    assert wait_for(lambda: codes(fake, small) == [302], 10)
