"""``kazoo-green`` verbs as an operator runs them, against the real broker on 127.0.0.1:5672
(and a port where nothing listens): publish, query, listen, health, and their errors."""

import json
import os
import subprocess
import sys

import pytest

from ..conftest import RABBIT_URL, event, rabbitmqctl, unique, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEAD_URL = 'amqp://guest:guest@127.0.0.1:5699//'   # nothing listens there


def cli(*args, brokers=RABBIT_URL, stdin=None, timeout=60):
    env = dict(os.environ, KAZOO_GREEN_BROKERS=brokers)
    env.pop('KAZOO_GREEN_NO_PATCH', None)
    return subprocess.run([sys.executable, '-m', 'kazoo_green'] + list(args), cwd=ROOT,
                          env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def listener(*args, brokers=RABBIT_URL):
    """A ``listen`` process, returned once it said it is consuming."""
    env = dict(os.environ, KAZOO_GREEN_BROKERS=brokers)
    proc = subprocess.Popen([sys.executable, '-m', 'kazoo_green', 'listen'] + list(args),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert line.startswith('kazoo-green: listening on'), line + proc.stderr.read()
    return proc


@pytest.fixture
def queue():
    """A queue bound to a new exchange: (exchange, queue), deleted afterwards."""
    exchange, name = unique('clix'), unique('cliq')
    holder = _Holder(exchange, name)
    yield holder
    holder.kz.stop(timeout=2)
    rabbitmqctl('delete_queue', name, check=False)


class _Holder(object):
    def __init__(self, exchange, name):
        import kazoo_green
        self.exchange, self.name = exchange, name
        self.kz = kazoo_green.Kazoo(RABBIT_URL, app_name='cli-test')
        self.kz.subscribe(exchange, '#', exchange_type='topic', queue=name,
                          auto_delete=False)
        self.got = []
        self.kz.add_route('kazoo:consumer-event', lambda payload, meta: self.got.append(
            (payload, meta)) if meta.exchange else None)


def test_help_shows_an_example_per_verb():
    out = cli('--help').stdout
    for verb in ('publish', 'query', 'listen', 'health'):
        assert 'kazoo-green %s ' % verb in out
        assert 'example:\n  kazoo-green %s' % verb in cli(verb, '--help').stdout


def test_publish_prints_the_msg_id_and_the_message_arrives(queue):
    queue.kz.start()
    assert queue.kz.wait_connected(10)
    r = cli('publish', queue.exchange, 'a.b', json.dumps(event('cli', 'pub', N=1)),
            '--header', 'X-Who=operator', '--confirm')
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: queue.got)
    payload, meta = queue.got[0]
    assert payload['Msg-ID'] == r.stdout.strip() and payload['N'] == 1
    assert payload['App-Name'] == 'kazoo-green-cli'
    assert meta.headers['X-Who'] == 'operator' and meta.routing_key == 'a.b'
    r = cli('publish', queue.exchange, 'a.c', '-', stdin='{"Event-Category": "cli", "N": 2}')
    assert r.returncode == 0, r.stderr
    assert wait_for(lambda: len(queue.got) == 2)


@pytest.mark.parametrize('text', ['{"a": ', '[1, 2]', '"x"', '', '{"a": 1} {"b": 2}'])
def test_bad_json_is_refused_before_anything_is_sent(text):
    # A dead broker: had it tried to connect, the status would be 3, not 2.
    r = cli('publish', 'x', 'y', text, brokers=DEAD_URL)
    assert r.returncode == 2
    assert r.stderr.startswith('kazoo-green: bad JSON argument') and 'Traceback' not in r.stderr
    assert r.stdout == ''


@pytest.mark.parametrize('args, status, reason', [
    (['publish', unique('nosuch'), 'k', '{}'], 1, 'unknown exchange'),
    (['publish', 'x', 'k', '{}', '--header', 'novalue'], 2, 'bad --header'),
    (['query', unique('nosuch'), 'k', '{}'], 1, 'unknown exchange'),
    (['query', 'amq.direct', unique('nobody'), '{}'], 1, 'unroutable'),
])
def test_errors_are_one_line_with_a_status(args, status, reason):
    r = cli(*args)
    assert (r.returncode, r.stdout) == (status, ''), r.stderr
    assert r.stderr.startswith('kazoo-green: ' + reason), r.stderr
    assert r.stderr.count('\n') == 1 and 'Traceback' not in r.stderr


@pytest.mark.parametrize('verb', ['publish', 'query'])
def test_no_broker_is_status_3(verb):
    r = cli(verb, 'x', 'k', '{}', '--connect-timeout', '0.5', brokers=DEAD_URL)
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith('kazoo-green: no broker reachable')
    assert 'Traceback' not in r.stderr


def test_query_prints_the_reply_and_times_out_with_status_1(runtimes):
    exchange = unique('cliq')
    responder = runtimes(RABBIT_URL)
    held = []

    @responder.event_route('kazoo:consumer-event-route-req')
    def answer(payload, meta):
        if payload.get('To') == 'slow':
            held.append(payload)   # never answered
            return
        responder.respond(payload, {'Event-Category': 'route', 'Event-Name': 'resp',
                                    'Route': 'sip:%s@127.0.0.1' % payload['To']}, meta)

    responder.subscribe(exchange, 'route.req')
    responder.start()
    assert responder.wait_connected(10)
    r = cli('query', exchange, 'route.req', json.dumps(event('route', 'req', To='bob')))
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert (reply['Route'], reply['Event-Name']) == ('sip:bob@127.0.0.1', 'resp')
    r = cli('query', exchange, 'route.req', json.dumps(event('route', 'req', To='slow')),
            '--timeout', '0.5')
    assert (r.returncode, r.stdout) == (1, '')
    assert r.stderr.startswith('kazoo-green: timeout: no reply'), r.stderr
    assert held


def test_listen_prints_one_json_line_per_message_and_stops_after_count(runtimes):
    exchange = unique('clil')
    sender = runtimes(RABBIT_URL)
    proc = listener(exchange, 'a.*', 'b.#', '--type', 'topic', '--count', '2')
    try:
        sender.publish(exchange, 'c.x', event('cli', 'skip'))   # not bound
        sender.publish(exchange, 'a.one', event('cli', 'one'), headers={'H': 'v'})
        sender.publish(exchange, 'b.two.three', event('cli', 'two'))
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(m['exchange'], m['routing_key'], m['zone'], m['body']['Event-Name'])
            for m in lines] == [(exchange, 'a.one', 'local', 'one'),
                                (exchange, 'b.two.three', 'local', 'two')]
    assert lines[0]['headers'] == {'H': 'v'} and lines[0]['body']['AMQP-Broker-Zone'] == 'local'


def test_listen_on_a_missing_exchange_without_type_fails_with_a_reason():
    env = dict(os.environ, KAZOO_GREEN_BROKERS=RABBIT_URL)
    r = subprocess.run([sys.executable, '-m', 'kazoo_green', 'listen', unique('nosuch'), 'k'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and 'refused the subscription' in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr


def test_health_reports_every_broker_and_fails_when_a_zone_has_none():
    r = cli('health', '--broker', RABBIT_URL, '--broker', 'zone=dc2;' + DEAD_URL,
            '--connect-timeout', '0.5')
    assert r.returncode == 4, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ['local', 'amqp://guest@127.0.0.1:5672//', 'up']
    assert lines[1].split()[:3] == ['dc2', 'amqp://guest@127.0.0.1:5699//', 'DOWN:']
    assert 'no broker up in zone dc2' in r.stderr
    r = cli('health', '--broker', RABBIT_URL, '--broker', DEAD_URL, '--connect-timeout', '0.5')
    assert r.returncode == 0, r.stdout + r.stderr   # the zone has one broker up
    assert [line.split()[2] for line in r.stdout.splitlines()] == ['up', 'DOWN:']


def test_listen_needs_only_the_zones_it_listens_in(runtimes):
    exchange = unique('clilz')
    sender = runtimes(RABBIT_URL)
    proc = listener(exchange, 'k', '--type', 'direct', '--count', '1', '--broker', RABBIT_URL,
                    '--broker', 'zone=dc2;' + DEAD_URL, '--connect-timeout', '0.5')
    try:
        sender.publish(exchange, 'k', event('cli', 'one'))
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert json.loads(out)['body']['Event-Name'] == 'one'


def test_listen_without_a_broker_is_status_3():
    r = cli('listen', 'x', 'k', '--connect-timeout', '0.5', brokers=DEAD_URL)
    assert r.returncode == 3 and r.stderr.startswith('kazoo-green: no broker reachable'), \
        r.stderr
