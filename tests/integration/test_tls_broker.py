"""Self-test of tests/tls.py: plain kombu against a real RabbitMQ TLS listener on loopback.

Proves: AMQPS with the test CA round-trips a message (hostname checked against the IP and the
DNS SAN); the plain port is the same node; a client that trusts the wrong CA, or expects another
hostname, fails with a verification error within seconds; a client certificate from the CA is
accepted and seen by the broker, one from the wrong CA is refused.  kazoo_green's own Kazoo
class over TLS is not tested here.
"""

import kazoo_green  # noqa: F401  (patches gevent before kombu is imported)

import ssl
from time import monotonic

import gevent
import kombu
import pytest

from tests.tls import tls_broker  # noqa: F401  (fixture)

from ..conftest import unique

pytestmark = pytest.mark.timeout(180)  # includes the node's boot in the first test

HANG = 60  # seconds after which a refused TLS connection counts as hung


def connection(url, ssl_opts):
    return kombu.Connection(url, ssl=ssl_opts, connect_timeout=5, heartbeat=0)


def round_trip(conn, publish_conn=None):
    """Declare a queue on ``conn``, publish to it through ``publish_conn`` (default ``conn``),
    basic.get it back on ``conn``; returns the payload."""
    name = unique('kgtls')
    channel = conn.channel()
    try:
        queue = kombu.Queue(name, channel=channel, durable=False)
        queue.declare()
        try:
            with (publish_conn or conn).Producer() as producer:
                producer.publish({'queue': name, 'via': 'tls'}, routing_key=name,
                                 serializer='json')
            deadline = monotonic() + 5
            msg = queue.get()
            while msg is None and monotonic() < deadline:
                gevent.sleep(0.02)
                msg = queue.get()
            assert msg is not None, 'message did not arrive in %s' % name
            msg.ack()
            return msg.payload
        finally:
            queue.delete()
    finally:
        channel.close()


def tls_socket(conn):
    sock = conn.connection.transport.sock
    assert isinstance(sock, ssl.SSLSocket), type(sock)  # gevent's, once ssl is patched
    return sock


def chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def connect_fails(url, ssl_opts):
    """Connect and open a channel; returns (exception, seconds).  kombu's connect() makes
    one retry, 2 s after the first failure: that is most of the time taken."""
    t0 = monotonic()
    conn = connection(url, ssl_opts)
    try:
        with gevent.Timeout(HANG, AssertionError('the refused connection hung')):
            with pytest.raises(Exception) as info:
                conn.connect()
                # TLS 1.3: the server verifies a client certificate after the client
                # finished its side of the handshake, so the refusal may only show on the
                # first read
                conn.default_channel
    finally:
        conn.release()
    return info.value, monotonic() - t0


@pytest.mark.parametrize('hostname', ['127.0.0.1', 'localhost'])
def test_amqps_round_trip_verified_against_the_ca(tls_broker, hostname):  # noqa: F811
    with connection(tls_broker.amqps_url, tls_broker.ssl(server_hostname=hostname)) as conn:
        conn.connect()
        sock = tls_socket(conn)
        assert sock.getpeername() == ('127.0.0.1', tls_broker.tls_port)
        subject = dict(rdn[0] for rdn in sock.getpeercert()['subject'])
        assert subject['commonName'] == 'kgtls test broker'
        print('\n[tls] %s: %s %s' % (hostname, sock.version(), sock.cipher()))
        assert sock.version() in ('TLSv1.2', 'TLSv1.3')
        assert round_trip(conn)['via'] == 'tls'


@pytest.mark.parametrize('version', [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=['TLSv1.2', 'TLSv1.3'])
def test_tls12_and_tls13_are_both_served(tls_broker, version):  # noqa: F811
    opts = tls_broker.ssl(tls_minimum_version=version, tls_maximum_version=version)
    with connection(tls_broker.amqps_url, opts) as conn:
        conn.connect()
        sock = tls_socket(conn)
        print('\n[tls] pinned %s: %s %s' % (version.name, sock.version(), sock.cipher()))
        assert sock.version() == version.name.replace('_', '.')
        assert round_trip(conn)


def test_plain_port_is_the_same_node(tls_broker):  # noqa: F811
    with connection(tls_broker.amqps_url, tls_broker.ssl()) as tls_conn, \
            kombu.Connection(tls_broker.amqp_url, connect_timeout=5, heartbeat=0) as plain:
        plain.connect()
        assert not isinstance(plain.connection.transport.sock, ssl.SSLSocket)
        assert round_trip(tls_conn, publish_conn=plain)['via'] == 'tls'


def test_wrong_ca_fails_fast_with_a_verification_error(tls_broker):  # noqa: F811
    exc, took = connect_fails(tls_broker.amqps_url, tls_broker.ssl(ca=tls_broker.wrong_ca))
    print('\n[tls] wrong CA: %.2f s: %r' % (took, exc))
    errors = [e for e in chain(exc) if isinstance(e, ssl.SSLCertVerificationError)]
    assert errors, repr(exc)
    # Erlang's ssl sends the root CA from cacertfile along with server.pem, so OpenSSL
    # meets an untrusted self-signed root in the chain rather than a missing issuer
    assert errors[0].verify_message in ('self-signed certificate in certificate chain',
                                        'unable to get local issuer certificate'), repr(exc)


def test_hostname_mismatch_fails_fast(tls_broker):  # noqa: F811
    exc, took = connect_fails(tls_broker.amqps_url,
                              tls_broker.ssl(server_hostname='not-the-broker.test'))
    errors = [e for e in chain(exc) if isinstance(e, ssl.SSLCertVerificationError)]
    assert errors and 'mismatch' in errors[0].verify_message, repr(exc)


def test_mutual_tls_with_the_client_cert(tls_broker):  # noqa: F811
    with connection(tls_broker.amqps_url, tls_broker.ssl(client_cert=True)) as conn:
        conn.connect()
        sock = tls_socket(conn)
        local_port = sock.getsockname()[1]
        assert round_trip(conn)
        # the broker saw (and, with verify_peer, verified) the certificate
        out = tls_broker.node.ctl(1, 'list_connections', 'peer_port', 'ssl', 'ssl_protocol',
                                  'peer_cert_subject', 'peer_cert_issuer')
        rows = [line.split('\t') for line in out.splitlines()]
        mine = [r for r in rows if r and r[0] == str(local_port)]
        print('\n[tls] broker side: %s' % mine)
        assert len(mine) == 1, out
        assert mine[0][1] == 'true'
        assert 'kgtls test client' in mine[0][3]
        assert 'TLS test CA' in mine[0][4]


@pytest.mark.parametrize('version', ['TLSv1_2', 'TLSv1_3'])
def test_client_cert_from_the_wrong_ca_is_refused(tls_broker, version):  # noqa: F811
    pinned = getattr(ssl.TLSVersion, version)
    exc, took = connect_fails(tls_broker.amqps_url, tls_broker.ssl(
        wrong_client_cert=True, tls_minimum_version=pinned, tls_maximum_version=pinned))
    print('\n[tls] wrong client cert (%s): %.2f s: %r' % (version, took, exc))
    errors = list(chain(exc))
    if version == 'TLSv1_2':
        # the broker checks the certificate inside the handshake: its alert comes then
        assert any(isinstance(e, ssl.SSLError) and 'UNKNOWN_CA' in str(e)
                   for e in errors), repr(exc)
    else:
        # TLS 1.3: the client's handshake is done before the broker has checked its
        # certificate; the broker then sends its alert and closes. Whether the client
        # reads the alert or meets the closed connection first (EOF, or a reset when it
        # wrote meanwhile) is a race of TCP, not of the broker: all are the refusal.
        assert any(isinstance(e, (ssl.SSLError, ConnectionResetError, BrokenPipeError))
                   for e in errors), repr(exc)
