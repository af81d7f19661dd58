"""The Kamailio example end to end: real Kamailio + app_python3, real sipp, real RabbitMQ.

One Kamailio (examples/kamailio/kamailio.cfg on 127.0.0.1:5060) and one responder
(examples/responder.py) serve the whole module; after every test Kamailio must still
run with all the processes it started with, and its log must show no crash.
"""

import os
import shutil
import time

import pytest

import kazoo_green

from ..conftest import RABBIT_URL, unique, wait_for
from . import harness

MISSING = [tool for tool in ('kamailio', 'kamcmd', 'sipp') if not shutil.which(tool)]

QUERY_TIMEOUT = 2.0


@pytest.fixture(scope='module')
def responder(logdir):
    # Not a skip: these tests are the proof the example works. `make test` installs them.
    assert not MISSING, 'missing %s: run tests/tools/services.sh' % ', '.join(MISSING)
    r = harness.Responder(str(logdir / 'responder.log'))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope='module')
def kamailio(logdir, responder):
    k = harness.Kamailio(str(logdir / 'kamailio.log'), node='kamailio@kgtest-%s' % unique('e2e'))
    k.start()
    yield k
    k.stop()
    harness.subprocess.run(['rabbitmqctl', '-q', 'delete_queue', '%s-resume' % k.node],
                           capture_output=True)


@pytest.fixture(autouse=True)
def kamailio_stays_healthy(request, kamailio):
    yield
    problem = kamailio.health()
    assert problem is None, problem


def _assert_all(result, code, calls):
    assert result.returncode == 0, result
    assert result.failed == 0 and result.successful == calls, result
    assert result.counts.get(code) == calls, result


@pytest.mark.parametrize('user', ['alice', 'asyncalice'], ids=['sync', 'async'])
def test_invites_get_302_with_the_routed_contact(kamailio, user):
    result = harness.run_sipp(harness.invite_scenario(user, 302), user, calls=400, rate=200)
    print('\n%s: %r' % (user, result))
    _assert_all(result, '302', 400)
    if user.startswith('async'):
        # Every reply acked after its resume (several at a time: kazoo_green._acks):
        # nothing left unacked on the resume queue, both its consumers still on it.
        queue = '%s-resume' % kamailio.node
        assert harness.wait_until(lambda: kamailio.queues().get(queue) == (2, 0), 5), \
            kamailio.queues().get(queue)


def test_no_kamailio_process_runs_a_python_thread(kamailio):
    """app_python3 keeps the GIL while Kamailio's C code runs: a thread (gevent's default
    resolver starts one at the first connect) would starve and wake every 5 ms to ask
    for it. After sync and async calls, every process has its main thread only."""
    for user in ('alice', 'asyncalice'):
        _assert_all(harness.run_sipp(harness.invite_scenario(user, 302), user, calls=20,
                                     rate=20), '302', 20)
    threads = {pid: len(os.listdir('/proc/%d/task' % pid)) for pid in kamailio.process_ids()}
    assert threads and all(n == 1 for n in threads.values()), threads


def test_unknown_user_gets_404(kamailio):
    result = harness.run_sipp(harness.invite_scenario('unknownbob', 404), 'unknownbob',
                              calls=200, rate=100)
    _assert_all(result, '404', 200)


def test_slow_user_gets_503_at_the_timeout(kamailio):
    # Sync queries hold a SIP worker (4 here) for the whole timeout: keep the load
    # within what 4 workers can serve at 2 s each (2 calls a second).
    result = harness.run_sipp(harness.invite_scenario('slowcarol', 503), 'slowcarol',
                              calls=8, rate=2)
    print('\nslow: %r, max %.0f ms' % (result, max(result.response_ms)))
    _assert_all(result, '503', 8)
    assert len(result.response_ms) == 8
    async_result = harness.run_sipp(harness.invite_scenario('asyncslow', 302), 'asyncslow',
                                    calls=20, rate=20)
    _assert_all(async_result, '302', 20)  # async users are answered by the same responder
    # a real deadline: nothing answered before it (sipp's clock, ms; tm timers 5%)
    assert all(ms >= QUERY_TIMEOUT * 1000 * 0.95 for ms in result.response_ms), \
        result.response_ms


def test_async_reply_after_the_deadline_gets_503_from_tms_timer(kamailio):
    """No resume in time: tm's own timer runs the failure route (on_timeout: 503) at the
    deadline; the late replies are then shed by the consumer processes, not resumed."""
    before, _ = settled(kamailio)   # the earlier tests' calls all pushed
    result = harness.run_sipp(harness.invite_scenario('asynclatecarol', 503),
                              'asynclatecarol', calls=20, rate=20)
    _assert_all(result, '503', 20)
    assert all(ms >= QUERY_TIMEOUT * 1000 * 0.95 for ms in result.response_ms), \
        result.response_ms
    grown = lambda name: kamailio.statistics()[name] - before[name]  # noqa: E731
    # The replies come 5 s after the requests, 3 s after their deadline.
    assert wait_for(lambda: grown('async_late') == 20, 15), grown('async_late')
    assert grown('queries_timeout') == 20 and grown('queries_ok') == 0
    assert 'resuming the processing of transaction' not in kamailio.log()


def test_register_is_published_to_registrar(kamailio):
    consumer = kazoo_green.Kazoo(RABBIT_URL, node=unique('e2e') + '@test')
    seen = []
    consumer.add_route('kazoo:consumer-event-directory-reg-success',
                       lambda p, m: seen.append((m.routing_key, p)))
    consumer.subscribe('registrar', 'registration.success.#', exchange_type='topic')
    consumer.start()
    try:
        assert consumer.wait_connected(10)   # its queue is bound once it is connected
        result = harness.run_sipp(harness.register_scenario('example.com'), 'reg.user',
                                  calls=50, rate=50)
        _assert_all(result, '200', 50)
        assert wait_for(lambda: len(seen) == 50, timeout=10), len(seen)
    finally:
        consumer.stop()
    key, payload = seen[0]
    assert key == 'registration.success.example%2Ecom.reg%2Euser'
    assert payload['Event-Category'] == 'directory' and payload['Event-Name'] == 'reg_success'
    assert (payload['Username'], payload['Realm']) == ('reg.user', 'example.com')
    assert payload['Contact'].startswith('<sip:reg.user@127.0.0.1:')
    assert payload['Call-ID'] and payload['App-Name'] == 'kamailio'
    assert payload['Node'] == kamailio.node
    assert len({p['Call-ID'] for _, p in seen}) == 50


def test_presence_events_land_in_the_htable(kamailio):
    kz = kazoo_green.Kazoo(RABBIT_URL, node=unique('e2e') + '@test')
    users = {'alice%d' % i: state for i, state in
             enumerate(['busy', 'idle', 'ringing', 'away', 'busy'])}
    for user, state in users.items():
        kz.publish('presence', 'update.%s.example%%2Ecom' % user, {
            'Event-Category': 'presence', 'Event-Name': 'update', 'From': user,
            'State': state})

    def htable():
        return {u: kamailio.kamcmd('htable.get', 'presence', u).stdout for u in users}

    assert wait_for(lambda: all(users[u] in v for u, v in htable().items()), timeout=10), \
        htable()
    # A later event for the same user overwrites the value.
    kz.publish('presence', 'update.alice0.example%2Ecom', {
        'Event-Category': 'presence', 'Event-Name': 'update', 'From': 'alice0',
        'State': 'offline'})
    assert wait_for(lambda: 'offline' in kamailio.kamcmd('htable.get', 'presence',
                                                         'alice0').stdout, timeout=10)


def test_statistics_count_every_call_summed_over_processes(kamailio):
    """kazoo_green's counters in Kamailio's statistics (kamcmd) and its latency histograms
    in xhttp_prom's /metrics (HTTP): every call of every SIP worker and of the consumer
    process, counted once."""
    route = (('route', 'kazoo:consumer-event-presence-update'),)
    callmgr = (('exchange', 'callmgr'),)
    before, scraped = settled(kamailio)
    sync, asyncs, unknown, events = 400, 100, 50, 30
    results = [harness.run_sipp(harness.invite_scenario(user, code), user, calls=n, rate=200)
               for user, code, n in (('statsalice', 302, sync), ('asyncstats', 302, asyncs),
                                     ('unknownstats', 404, unknown))]
    for result, (code, n) in zip(results, (('302', sync), ('302', asyncs), ('404', unknown))):
        _assert_all(result, code, n)
    kz = kazoo_green.Kazoo(RABBIT_URL, node=unique('e2e') + '@test')
    for n in range(events):
        kz.publish('presence', 'update.stats%d.example%%2Ecom' % n, {
            'Event-Category': 'presence', 'Event-Name': 'update', 'From': 'stats%d' % n,
            'State': 'busy'})
    calls = sync + asyncs + unknown

    def grown(name):
        return kamailio.statistics()[name] - before[name]

    # SIP workers push after each call, the consumer process every second: wait for it.
    assert wait_for(lambda: grown('queries_ok') == calls and grown('consumed') == events, 15), \
        (grown('queries_ok'), grown('consumed'))
    now = kamailio.statistics()
    assert now['queries'] - before['queries'] == calls
    assert now['queries_timeout'] == before['queries_timeout']
    assert now['queries_failed'] == before['queries_failed']
    assert now['acked'] - before['acked'] == events            # the late-ack subscription
    assert now['handler_errors'] == before['handler_errors']
    # published: the requests (one message per async query: no notice)
    assert now['published'] - before['published'] == calls
    assert now['links_up'] >= 2 and now['links_down'] == 0, now
    assert now['pending_queries'] == 0 and now['buffered_publishes'] == 0, now

    m = kamailio.metrics()
    count = 'kamailio_kazoo_green_query_seconds_count'
    assert m[(count, callmgr)] - scraped.get((count, callmgr), 0) == calls
    buckets = sorted((float(dict(k[1])['le']), v) for k, v in m.items()
                     if k[0] == 'kamailio_kazoo_green_query_seconds_bucket'
                     and dict(k[1]).get('exchange') == 'callmgr')
    assert buckets[-1] == (float('inf'), m[(count, callmgr)])
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)   # cumulative
    handled = 'kamailio_kazoo_green_handler_seconds_count'
    assert wait_for(lambda: kamailio.metrics()[(handled, route)]
                    - scraped.get((handled, route), 0) == events, 10)
    # The counters are there too, through xhttp_prom_stats "all".
    assert m[('kamailio_kazoo_green_queries_ok', ())] >= before['queries_ok'] + calls

    health = _kamailio_health()
    print('\n' + health.stdout)
    assert health.returncode == 0, health
    assert 'links_down           0' in health.stdout


def settled(kamailio):
    """Statistics and metrics once all done so far is in them: each consumer process
    (kazoo_consumer, kazoo_resumer) stores its own values every second and the pusher
    sums every process's every second, so three pushes after this call began (two whole
    intervals: a store, then a push after it; the ``pushes`` count says when) everything
    before it is counted."""
    first = kamailio.statistics()['pushes']
    assert wait_for(lambda: kamailio.statistics()['pushes'] >= first + 3, 10)
    return kamailio.statistics(), kamailio.metrics()


def test_responder_killed_mid_load_gives_503_then_recovers(kamailio, responder):
    seconds, rate = 8, 150
    waits = [harness.spawn_sipp(harness.invite_scenario(user, 302, 503), user,
                                calls=seconds * rate, rate=rate)
             for user in ('bob', 'asyncbob')]
    time.sleep(2)
    responder.kill()
    time.sleep(3)
    responder.start()
    results = [wait() for wait in waits]
    for result in results:
        print('\nkill: %r' % result)
        assert result.returncode == 0 and result.failed == 0, result
        assert result.counts.get('302', 0) > 0 and result.counts.get('503', 0) > 0, result
        assert result.counts['302'] + result.counts['503'] == seconds * rate, result
    for user in ('bob', 'asyncbob'):  # recovered
        _assert_all(harness.run_sipp(harness.invite_scenario(user, 302), user, calls=200,
                                     rate=100), '302', 200)


def test_broker_down_sip_workers_answer_503(kamailio, responder):
    """Every broker gone: every call is answered 503 (connects are refused at once, no SIP
    worker waits out its query timeout), and all recovers after."""
    harness.subprocess.run(['rabbitmqctl', '-q', 'stop_app'], check=True, timeout=120)
    try:
        waits = [harness.spawn_sipp(harness.invite_scenario(user, 503), user, calls=150,
                                    rate=50)
                 for user in ('dave', 'asyncdave')]
        results = [wait() for wait in waits]
        # Kamailio's own view: its processes' connections are down (exit 4).
        health = _kamailio_health()
        print('\nhealth while the broker is down (exit %d):\n%s%s'
              % (health.returncode, health.stdout, health.stderr))
        assert health.returncode == 4, health
        assert kamailio.statistics()['links_down'] > 0
    finally:
        harness.subprocess.run(['rabbitmqctl', '-q', 'start_app'], check=True, timeout=120)
    for result in results:
        # every call answered (4 SIP workers, 50 cps: a worker held much longer than
        # the query timeout would leave calls unanswered)
        print('\nbroker down: %r, slowest %.0f ms' % (result, max(result.response_ms)))
        _assert_all(result, '503', 150)
    assert harness.wait_until(lambda: harness.rabbit_queues().get(
        harness.Responder.QUEUE, (0, 0))[0] >= 1, 30), 'responder did not come back'
    for user in ('erin', 'asyncerin'):
        assert harness.wait_until(lambda: harness.run_sipp(
            harness.invite_scenario(user, 302), user, calls=5, rate=5).returncode == 0, 30)
        _assert_all(harness.run_sipp(harness.invite_scenario(user, 302), user, calls=200,
                                     rate=100), '302', 200)
    # Healthy again once the consumer process is back on the broker.
    assert harness.wait_until(lambda: _kamailio_health().returncode == 0, 30), \
        _kamailio_health()


def _kamailio_health():
    return harness.subprocess.run(
        [harness.PYTHON, '-m', 'kazoo_green', 'health', '--kamailio', '--kamcmd-socket',
         harness.CTL], capture_output=True, text=True, timeout=30)


def test_kamailio_log_has_no_python_errors(kamailio):
    log = kamailio.log()
    assert 'Traceback' not in log and 'Unhandled exception' not in log, \
        log[log.find('Traceback') - 2000:][:6000]
