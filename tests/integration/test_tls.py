"""kazoo_green over TLS, against a real RabbitMQ TLS listener (tests/tls.py).

Every path: the blocking caller-driven lane (SIP workers), cooperative caller-driven
calls, started background links, consumers with late acks, confirms, and the errors an
operator meets (a wrong CA, a host name the certificate does not name), with no hang.
The async query over TLS runs in real Kamailio (tests/e2e).
"""

import kazoo_green  # noqa: F401  (gevent's patching first)

import os
import ssl
import subprocess
import sys

import gevent
import pytest

from kazoo_green import NotConnected

from ..conftest import event, unique, wait_for
from . import responders
from ..tls import tls_broker  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(240)  # includes the node's boot in the first test

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tls_responder(tls_broker):  # noqa: F811
    """A responder process (tests.integration.responders) on the TLS node's plain port:
    the blocking caller stops every greenlet of this process while it waits."""
    made = []

    def make(exchange, style='kazoo'):
        made.append(responders.spawn(exchange, style, url=tls_broker.amqp_url))
        return made[-1]

    yield make
    for proc in made:
        proc.kill()
        proc.wait()


def options(broker, **extra):
    opts = {'ca_certs': broker.ca}
    opts.update(extra)
    return opts


def assert_tls(link):
    assert link.connected and link._conn.ssl, 'not a TLS connection'
    assert isinstance(link._raw.transport.sock, ssl.SSLSocket)
    assert link.fast is not None and link.fast.tls   # the lean path, over TLS


@pytest.mark.parametrize('style', ['kazoo', 'generic'])
def test_blocking_lane_queries_over_tls(runtimes, tls_broker, tls_responder, style):  # noqa: F811
    exchange = unique('callmgr')
    tls_responder(exchange, style)
    kz = runtimes(tls_broker.amqps_url, ssl=options(tls_broker), blocking=True,
                  query_timeout=5)
    for i in range(300):
        reply = kz.query(exchange, 'route.req', event('route', 'req', To='u%d' % i))
        assert reply['Answer'] == 'u%d' % i and reply['Style'] == style
    assert_tls(kz._pub_link)
    assert kz._pub_link.fast.blocking
    reply = kz.query(exchange, 'route.req', event('route', 'req', To='h'),
                     headers={'X-Trace': 'abc'})
    assert reply['Headers'] == {'X-Trace': 'abc'}
    kz.publish(exchange, 'nobody.listens', event('a', 'b'))
    stats = kz.stats()
    assert stats['queries_ok'] == 301 and stats['connection_errors'] == 0


def test_started_runtime_consumes_confirms_and_answers_over_tls(runtimes, tls_broker):  # noqa: F811
    exchange, callmgr = unique('ex'), unique('callmgr')
    kz = runtimes(tls_broker.amqps_url, ssl=options(tls_broker), confirm_timeout=10,
                  query_timeout=5)
    seen = []
    events = []

    @kz.event_route('kazoo:consumer-event-t-x')
    def handle(payload, meta):
        seen.append((payload['n'], meta.redelivered))

    @kz.event_route('kazoo:consumer-event-t-req')
    def respond(request, meta):
        kz.respond(request, event('t', 'resp', k=request['k']), meta)

    kz.add_route('kazoo:consumer-event-connection-open', lambda p, m: events.append(p))
    kz.subscribe(exchange, '#', exchange_type='topic', ack='late')
    kz.subscribe(callmgr, 't.req', exchange_type='topic')
    kz.start()
    assert kz.wait_connected(20)
    for link in (kz._pub_link, kz._sub_link):
        assert_tls(link)
        assert not link.fast.blocking
    for n in range(500):
        kz.publish(exchange, 't.x', event('t', 'x', n=n), confirm=(n % 50 == 0))
    assert wait_for(lambda: len(seen) == 500, timeout=30), len(seen)
    assert sorted(n for n, _ in seen) == list(range(500))
    jobs = [gevent.spawn(kz.query, callmgr, 't.req', event('t', 'req', k=k)) for k in range(50)]
    gevent.joinall(jobs, timeout=30, raise_error=True)
    assert [job.value['k'] for job in jobs] == list(range(50))
    stats = kz.stats()
    assert stats['confirmed'] == 10 and stats['acked'] >= 550
    assert stats['connection_errors'] == 0 and stats['bad_input'] == 0
    assert {e['Link'] for e in events} == {'publish', 'consume'}


def test_cooperative_caller_and_py_amqp_frames_over_tls(runtimes, tls_broker, tls_responder):  # noqa: F811
    """Caller-driven without blocking (a greenlet reads while it waits), and fast=False
    (py-amqp does every frame itself): both over TLS."""
    exchange = unique('callmgr')
    tls_responder(exchange)
    for fast in (True, False):
        kz = runtimes(tls_broker.amqps_url, ssl=options(tls_broker), fast=fast,
                      query_timeout=5)
        jobs = [gevent.spawn(kz.query, exchange, 'route.req', event('route', 'req', To=str(i)))
                for i in range(20)]
        gevent.joinall(jobs, timeout=30, raise_error=True)
        assert [job.value['Answer'] for job in jobs] == [str(i) for i in range(20)]
        assert kz.publish('amq.topic', 'x', event('a', 'b'), confirm=True)
        assert (kz._pub_link.fast is not None) is fast
        assert kz._pub_link._conn.ssl


def test_amqps_url_uses_the_systems_cas_by_default(tls_broker):  # noqa: F811
    """``amqps://`` with no ssl option: TLS, the peer verified against the system's CAs,
    which SSL_CERT_FILE names here (as an operator trusts a private CA); without it the
    same connection is refused."""
    script = """
import kazoo_green, sys
from kazoo_green import Kazoo, NotConnected
try:
    Kazoo(sys.argv[1], node='kgtest-tls-default@test').publish(
        'amq.topic', 'x', {'a': 1}, confirm=True)
    print('published')
except NotConnected as exc:
    print('refused:', exc)
"""
    outs = []
    for env in (dict(os.environ, SSL_CERT_FILE=tls_broker.ca),
                dict((k, v) for k, v in os.environ.items() if not k.startswith('SSL_CERT'))):
        out = subprocess.run([sys.executable, '-c', script, tls_broker.amqps_url],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        outs.append(out.stdout.strip())
    assert outs[0] == 'published', outs
    assert outs[1].startswith('refused:') and 'CERTIFICATE_VERIFY_FAILED' in outs[1], outs


def test_host_name_is_checked_for_the_broker_being_connected(runtimes, tls_broker):  # noqa: F811
    """The host name checked is the URL's, worked out per attempt: here the first broker
    (127.0.0.2) refuses, the second (127.0.0.1) must be checked as 127.0.0.1."""
    port = tls_broker.tls_port
    urls = ['amqps://guest:guest@127.0.0.2:%d//' % port,
            'amqps://guest:guest@127.0.0.1:%d//' % port]
    kz = runtimes(urls, ssl=options(tls_broker), connect_timeout=5)
    assert kz.publish('amq.topic', 'x', event('a', 'b'), confirm=True)
    assert kz._pub_link.host == '127.0.0.1:%d' % port
    assert kz.stats()['connection_errors'] == 1   # the refusing one
    # a name the certificate does not carry fails, and says why
    wrong = runtimes(tls_broker.amqps_url, ssl=options(tls_broker,
                                                       server_hostname='broker.example'))
    with pytest.raises(NotConnected, match='(?i)hostname mismatch|certificate'):
        wrong.publish('amq.topic', 'x', event('a', 'b'), confirm=True)
    # ... unless host name checking is off (the chain is still verified)
    lax = runtimes(tls_broker.amqps_url, ssl=options(tls_broker,
                                                     server_hostname='broker.example',
                                                     check_hostname=False))
    assert lax.publish('amq.topic', 'x', event('a', 'b'), confirm=True)


def test_wrong_ca_is_a_clear_error_and_no_hang(runtimes, tls_broker):  # noqa: F811
    opts = options(tls_broker, ca_certs=tls_broker.wrong_ca)
    caller = runtimes(tls_broker.amqps_url, ssl=opts, blocking=True, connect_timeout=5)
    with gevent.Timeout(60, AssertionError('a refused TLS connection hung')):
        with pytest.raises(NotConnected) as failed:
            caller.query('amq.topic', 'x', event('a', 'b'), timeout=30)
    assert 'CERTIFICATE_VERIFY_FAILED' in str(failed.value), failed.value
    assert 'timed out' not in str(failed.value)   # refused, not waited for
    started = runtimes(tls_broker.amqps_url, ssl=opts, connect_timeout=5)
    lost = []
    started._pub_link.on_down(lambda link, exc: lost.append(exc))
    started.start()
    assert wait_for(lambda: started.stats()['connection_errors'] >= 3, timeout=30)
    assert not started.connected
    with pytest.raises(NotConnected):   # waits for the first connect, then says so
        started.query('amq.topic', 'x', event('a', 'b'), timeout=1)


def test_mutual_tls_with_a_client_certificate(runtimes, tls_broker):  # noqa: F811
    kz = runtimes(tls_broker.amqps_url, ssl=options(tls_broker, certfile=tls_broker.client_cert,
                                                    keyfile=tls_broker.client_key))
    assert kz.publish('amq.topic', 'x', event('a', 'b'), confirm=True)
    port = kz._pub_link._raw.transport.sock.getsockname()[1]
    out = tls_broker.node.ctl(1, 'list_connections', 'peer_port', 'peer_cert_subject')
    assert any(line.startswith('%d\t' % port) and 'kgtls test client' in line
               for line in out.splitlines()), out
