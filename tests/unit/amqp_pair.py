"""A real py-amqp Connection over one end of a loopback TCP pair, without a broker.

``Pair`` assembles the connection the way ``amqp.Connection.connect()`` does once its
socket is up (transport, kazoo_green's frame handler, frame writer), then puts a
FastPath on it; ``peer`` is the broker's end of the socket, plain or TLS (certificates
from trustme). Tests write what a broker would send to ``peer`` and read what the
client wrote from it.
"""

import kazoo_green  # noqa: F401  (gevent's patching first)

import socket
import ssl

import amqp
import gevent
import trustme
from amqp.method_framing import frame_writer

from kazoo_green._amqpfast import FastPath
from kazoo_green._deliver import Consumers, FrameHandler

__all__ = ['Pair', 'tcp_pair', 'tls_pair', 'deliver_frames', 'HEARTBEAT']

HEARTBEAT = b'\x08\x00\x00\x00\x00\x00\x00\xce'


def tcp_pair():
    """Two connected gevent TCP sockets on 127.0.0.1 (client, server)."""
    listener = socket.socket()
    listener.bind(('127.0.0.1', 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


_CA = []


def tls_pair():
    """Like tcp_pair, both ends wrapped in TLS (handshake done)."""
    if not _CA:
        _CA.append(trustme.CA())
    ca = _CA[0]
    client, server = tcp_pair()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert('127.0.0.1').configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    client = client_ctx.wrap_socket(client, server_hostname='127.0.0.1',
                                    do_handshake_on_connect=False)
    server = server_ctx.wrap_socket(server, server_side=True, do_handshake_on_connect=False)
    jobs = [gevent.spawn(client.do_handshake), gevent.spawn(server.do_handshake)]
    gevent.joinall(jobs, timeout=10, raise_error=True)
    return client, server


class Pair(object):
    def __init__(self, blocking=True, tls=False, frame_max=131072, read_ahead=b'',
                 fast=True):
        client, self.peer = tls_pair() if tls else tcp_pair()
        self.consumers = Consumers()
        self.blocked = []
        conn = amqp.Connection('127.0.0.1:5672', frame_handler=FrameHandler.factory(
            self.consumers), on_blocked=self.blocked.append)
        conn.frame_max = frame_max
        cls = amqp.transport.SSLTransport if tls else amqp.transport.TCPTransport
        transport = cls('127.0.0.1:5672')
        transport.sock = client
        transport.connected = True
        transport._read_buffer = read_ahead   # as if py-amqp had read ahead
        # what its _setup_transport does (TLS: the socket is wrapped already)
        transport._quick_recv = client.read if tls else client.recv
        conn.transport = transport
        # what amqp.Connection.connect() does once the socket is up:
        conn.on_inbound_frame = conn.frame_handler_cls(conn, conn.on_inbound_method)
        conn.frame_writer = conn.frame_writer_cls(conn, transport)
        self.conn = conn
        self.fast = FastPath(conn, blocking=blocking) if fast else None

    def channel(self, channel_id):
        return self.conn.channels.get(channel_id) or amqp.Channel(self.conn, channel_id)

    def consume(self, channel_id, tag):
        """Deliveries for consumer ``tag`` on ``channel_id`` go to the list returned."""
        got = []
        self.channel(channel_id)
        self.consumers[(channel_id, tag)] = got.append
        return got

    def send(self, data):
        """What the broker sends."""
        self.peer.sendall(data)

    def received(self, size, timeout=5):
        """``size`` bytes the client wrote."""
        data = b''
        with gevent.Timeout(timeout):
            while len(data) < size:
                chunk = self.peer.recv(size - len(data))
                if not chunk:
                    break
                data += chunk
        return data

    def pump(self, limit=100):
        """Read (without blocking for long) and handle what the broker sent so far."""
        for _ in range(limit):
            if not self.fast.has_pending():
                return
            try:
                self.fast.drain(0.5)
            except socket.timeout:
                return

    def close(self):
        for sock in (self.conn.transport.sock, self.peer):
            try:
                sock.close()
            except OSError:
                pass


class _Writes(object):
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(bytes(data))


class _Writer(object):
    """Enough of amqp.Connection for py-amqp's frame_writer."""

    def __init__(self, frame_max):
        self.frame_max = frame_max
        self.bytes_sent = 0
        self.transport = _Writes()


def pyamqp_frames(frame_max, channel_id, method_sig, args, message=None):
    """The bytes py-amqp's frame_writer writes for one method (and its content)."""
    conn = _Writer(frame_max)
    frame_writer(conn, conn.transport)(1, channel_id, method_sig, args, message)
    return b''.join(conn.transport.written)


def deliver_frames(channel_id, tag, delivery_tag, body, properties, exchange='ex',
                   routing_key='rk', frame_max=131072, redelivered=False):
    """The frames of a basic.deliver, as py-amqp would write them."""
    args = amqp.serialization.dumps('sLbss', (tag, delivery_tag, redelivered, exchange,
                                              routing_key))
    return pyamqp_frames(frame_max, channel_id, (60, 60), args,
                         amqp.Message(body, **properties))
