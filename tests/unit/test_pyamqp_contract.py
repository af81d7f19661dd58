"""What kazoo_green relies on in py-amqp and gevent beyond their documented API.

Each test pins one behaviour FastPath (``_amqpfast`` through ``_pyamqp``) or the frame
handler (``_deliver``) depends on, on the installed versions, on a real py-amqp
transport over loopback TCP or TLS. A library upgrade that changes one of them fails
here, by name, instead of somewhere in a query. CI runs this file at the newest and at
the lowest versions requirements.txt allows (``make test-lowest``).
"""

from .amqp_pair import HEARTBEAT, Pair, deliver_frames, pyamqp_frames, tls_pair  # noqa: I100

import socket
import ssl
from time import monotonic

import amqp
import gevent
import pytest

from kazoo_green import _pyamqp
from kazoo_green._amqpfast import FastPath, HookUnavailable
from kazoo_green._deliver import FrameHandler

TRANSPORTS = [pytest.param(False, id='tcp'), pytest.param(True, id='tls')]


def test_installed_py_amqp_is_a_supported_one():
    assert _pyamqp.supported_version(), (amqp.__version__, _pyamqp.SUPPORTED)


@pytest.mark.parametrize('tls', TRANSPORTS)
def test_transports_have_the_hooks_and_fastpath_takes_them(tls):
    pair = Pair(tls=tls)
    assert _pyamqp.check(pair.conn.transport) is None
    assert pair.fast.tls is tls
    pair.close()


def test_connection_takes_our_frame_handler_and_connect_would_call_it_so():
    made = []

    def factory(connection, callback):
        made.append((connection, callback))
        return made

    conn = amqp.Connection('127.0.0.1:5672', frame_handler=factory)
    # amqp.Connection.connect() builds its frame handler as frame_handler_cls(self,
    # self.on_inbound_method): the Pair helper (and FastPath's check) rely on it.
    assert conn.frame_handler_cls is factory
    assert callable(conn.on_inbound_method)


def test_read_ahead_buffer_is_where_py_amqp_keeps_bytes_it_read_early():
    pair = Pair(fast=False)
    frames = deliver_frames(1, 't', 1, b'{}', {})
    pair.send(frames + HEARTBEAT)
    pair.conn.transport.sock.settimeout(2)
    assert pair.conn.transport.read_frame()[0] == 1   # py-amqp's own reader
    # whatever it read beyond that frame is in _read_buffer or still on the socket
    left = _pyamqp.take_read_ahead(pair.conn.transport)
    assert isinstance(left, bytes) and (frames + HEARTBEAT).endswith(left) or left == b''
    pair.close()


@pytest.mark.parametrize('tls', TRANSPORTS)
def test_drain_events_reads_through_the_replaced_read_frame(tls):
    pair = Pair(tls=tls)
    reads = []
    original = pair.conn.transport.read_frame
    _pyamqp.serve_reads(pair.conn.transport, lambda *a: reads.append(1) or original(*a))
    blocked = pyamqp_frames(131072, 0, (10, 60), amqp.serialization.dumps('s', ('x',)))
    pair.send(blocked)
    pair.conn.drain_events(timeout=2)   # py-amqp's public API
    assert reads and len(pair.blocked) == 1
    pair.close()


@pytest.mark.parametrize('tls', TRANSPORTS)
def test_py_amqps_writes_go_through_the_replaced_write(tls):
    """Blocking FastPath: a py-amqp method (here basic.qos) is written by FastPath._write,
    so it waits in poll(2): with the peer not reading, it times out after write_timeout
    instead of waiting in gevent's hub for ever."""
    pair = Pair(tls=tls)
    channel = pair.channel(1)
    channel.send_method((60, 10), 'lBb', (0, 5, False))
    expected = pyamqp_frames(131072, 1, (60, 10), amqp.serialization.dumps('lBb', (0, 5, False)))
    assert pair.received(len(expected)) == expected
    pair.fast.write_timeout = 0.2
    with gevent.Timeout(20, AssertionError('py-amqp wrote past FastPath: it waited in the hub')):
        with pytest.raises(socket.timeout):
            for _ in range(10000):   # fill the socket buffers: the peer reads nothing
                pair.conn.transport.write(b'\x08' * 65536)
    pair.close()


def test_a_frame_fastpath_read_counts_as_life_for_py_amqps_heartbeat_check():
    pair = Pair()
    conn = pair.conn
    conn.heartbeat = 1
    conn.last_heartbeat_sent = conn.last_heartbeat_received = monotonic() - 10
    conn.prev_sent = conn.bytes_sent
    conn.prev_recv = conn.bytes_recv
    conn.send_heartbeat = lambda: None
    with pytest.raises(amqp.exceptions.ConnectionForced):
        conn.heartbeat_tick()   # nothing heard for 10 heartbeats
    conn.last_heartbeat_received = monotonic() - 10
    conn.prev_recv = conn.bytes_recv
    pair.send(HEARTBEAT)
    pair.pump()
    conn.heartbeat_tick()   # FastPath counted the frame: no error
    pair.close()


def test_fastpath_end_of_stream_marks_the_transport_closed_for_py_amqp():
    pair = Pair()
    assert pair.conn.connected
    pair.peer.close()
    with pytest.raises(OSError):
        pair.fast.drain(2)
    assert not pair.conn.connected   # amqp.Connection.connected reads transport.connected
    pair.close()


def test_fastpath_refuses_a_connection_without_its_frame_handler():
    pair = Pair(fast=False)
    pair.conn.on_inbound_frame = amqp.method_framing.frame_handler(
        pair.conn, pair.conn.on_inbound_method)
    with pytest.raises(HookUnavailable):
        FastPath(pair.conn)
    assert isinstance(Pair(fast=False).conn.on_inbound_frame, FrameHandler)
    pair.close()


def test_fastpath_refuses_a_transport_without_the_hooks():
    pair = Pair(fast=False)

    class Bare(object):
        sock = pair.conn.transport.sock

    pair.conn.transport = Bare()
    with pytest.raises(HookUnavailable, match='_read_buffer'):
        FastPath(pair.conn)
    pair.close()


def test_gevent_ssl_socket_with_zero_timeout_never_waits():
    """FastPath's TLS reads and writes rely on gevent's SSLSocket raising (recv) or
    returning 0 (send) at once with timeout 0, never switching to the hub."""
    client, server = tls_pair()
    assert client.pending() == 0
    client.settimeout(0.0)
    switched = []
    probe = gevent.spawn(switched.append, 1)
    with pytest.raises(ssl.SSLWantReadError):
        client.recv(100)
    assert not switched   # no hub switch happened
    server.sendall(b'hello')
    deadline = monotonic() + 5
    data = b''
    while data != b'hello' and monotonic() < deadline:
        try:
            data += client.recv(100)
        except ssl.SSLWantReadError:
            gevent.sleep(0.01)
    assert data == b'hello'
    assert client.send(b'x' * 1000) == 1000
    probe.kill()
    client.close()
    server.close()
