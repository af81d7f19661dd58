"""The lean frame path writes what py-amqp writes and reads what py-amqp reads."""

import socket
from collections import defaultdict
from time import monotonic

import amqp
import pytest
from amqp.method_framing import frame_handler, frame_writer

from kazoo_green._amqpfast import (Delivered, FastPath, decode_properties, encode_publish,
                                   encode_request)


class FakeConnection(object):
    """Enough of amqp.Connection for frame_writer/frame_handler and FastPath."""

    def __init__(self, frame_max=131072):
        self.frame_max = frame_max
        self.bytes_sent = self.bytes_recv = 0
        self.channels = {}
        self.methods = []
        self.on_inbound_frame = frame_handler(self, self._method)
        self.transport = FakeTransport()

    def _method(self, channel, method_sig, buf, content):
        self.methods.append((channel, method_sig, content))


class FakeTransport(object):
    def __init__(self):
        self.written = []
        self._read_buffer = b''
        self.sock = FakeSocket()
        self.connected = True

    def write(self, data):
        self.written.append(bytes(data))


class FakeSocket(object):
    """A socket whose recv hands out scripted chunks."""

    def __init__(self):
        self.chunks = []
        self.timeout = None
        self._sock = None

    def fileno(self):
        return 0

    def settimeout(self, value):
        self.timeout = value

    def gettimeout(self):
        return self.timeout

    def recv(self, n):
        if not self.chunks:
            raise socket.timeout()
        return self.chunks.pop(0)


def pyamqp_publish_bytes(frame_max, channel_id, exchange, routing_key, body, properties,
                         headers, mandatory):
    conn = FakeConnection(frame_max)
    write = frame_writer(conn, conn.transport)
    props = dict(properties)
    if headers:
        props['application_headers'] = headers
    msg = amqp.Message(body, **props)
    args = amqp.serialization.dumps('Bssbb', (0, exchange, routing_key, mandatory, False))
    write(1, channel_id, (60, 40), args, msg)
    return b''.join(conn.transport.written)


CASES = [
    (1, 'callmgr', 'route.req', b'{"a":1}', {'content_type': 'application/json',
                                             'content_encoding': 'utf-8'}, None, False),
    (7, '', 'amq.rabbitmq.reply-to.abc', b'x' * 100,
     {'content_type': 'application/json', 'content_encoding': 'utf-8',
      'correlation_id': 'kgasync:1:2:a:b:3:uuid', 'reply_to': 'q'}, None, True),
    (3, 'ex', 'k', b'', {'content_type': 'application/json', 'delivery_mode': 2}, None, False),
    (2, 'ex', 'k', b'{}', {'content_type': 'text/plain', 'expiration': '1000',
                           'message_id': 'm1'}, {'h': 'v', 'n': 1, 'b': True}, False),
    (2, 'ex\u00e9', 'clé', 'é'.encode() * 10, {}, None, False),
    (4, 'ex', 'k', b'{}', {'priority': 5, 'timestamp': 1700000000, 'type': 't',
                           'user_id': 'guest', 'app_id': 'kamailio', 'cluster_id': 'c',
                           'delivery_mode': 1, 'reply_to': 'r'}, None, False),
]


@pytest.mark.parametrize('case', CASES)
def test_publish_frames_match_py_amqp(case):
    assert encode_publish(*case, frame_max=131072) == pyamqp_publish_bytes(131072, *case)


def test_large_body_is_split_like_py_amqp():
    case = (5, 'ex', 'k', bytes(range(256)) * 40, {'content_type': 'application/json'}, None,
            False)
    assert encode_publish(*case, frame_max=4096) == pyamqp_publish_bytes(4096, *case)


@pytest.mark.parametrize('body,correlation_id,reply_to,headers,frame_max', [
    (b'{"a":1}', 'd7c2f6a4-3b5e-4e8a-9c1d-2f0e6b7a8c9d', 'amq.rabbitmq.reply-to', None,
     131072),
    (b'{"a":1}', 'm1', None, None, 131072),
    (b'{"\xc3\xa9":1}', '\u00e9' * 3, 'q', None, 131072),
    (b'{"a":1}', 'm1', 'q', {'h': 'v', 'n': 2}, 131072),   # headers: the general path
    (b'x' * 5000, 'm1', 'q', None, 4096),    # split in body frames: the general path
    (b'', 'm1', 'q', None, 131072),          # no body frame
    (b'{}', 'c' * 256, 'q', None, 131072),   # too long: encode_publish raises
])
def test_request_frames_are_encode_publishs(body, correlation_id, reply_to, headers,
                                            frame_max):
    props = {'content_type': 'application/json', 'content_encoding': 'utf-8',
             'correlation_id': correlation_id, 'reply_to': reply_to}
    args = (3, 'callmgr', 'route.req', body)
    if len(correlation_id) > 255:
        with pytest.raises(ValueError):
            encode_request(*args, correlation_id, reply_to, headers, True, frame_max)
        return
    assert encode_request(*args, correlation_id, reply_to, headers, True, frame_max) == \
        encode_publish(*args, props, headers, True, frame_max) == \
        pyamqp_publish_bytes(frame_max, *args, dict((k, v) for k, v in props.items() if v),
                             headers, True)


def test_short_strings_are_bounded():
    with pytest.raises(ValueError):
        encode_publish(1, 'x' * 256, 'k', b'', {}, None, False, 131072)


class FakeChannel(object):
    def __init__(self):
        self.callbacks = {}
        self.rejected = []

    def basic_reject(self, tag, requeue):
        self.rejected.append((tag, requeue))


class FakePoller(object):
    def __init__(self, sock):
        self.sock = sock

    def poll(self, ms):
        return [(0, 1)] if self.sock.chunks else []


def make_fast(conn):
    """A FastPath over the scripted socket (its poll-based waits never block)."""
    fast = FastPath.__new__(FastPath)
    fast.connection = conn
    fast.transport = conn.transport
    fast.sock = conn.transport.sock
    fast.frame_max = conn.frame_max
    fast.blocking = True
    fast._poller = FakePoller(fast.sock)
    fast._raw_recv = fast.sock.recv
    fast._buf = bytearray()
    fast._pos = 0
    fast._inbound = conn.on_inbound_frame
    fast._pending = {}
    fast._write = conn.transport.write
    return fast


def deliver_frames(channel_id, tag, delivery_tag, body, properties, exchange='ex',
                   routing_key='rk', frame_max=131072, redelivered=False):
    args = amqp.serialization.dumps('sLbss', (tag, delivery_tag, redelivered, exchange,
                                              routing_key))
    conn = FakeConnection(frame_max)
    write = frame_writer(conn, conn.transport)
    write(1, channel_id, (60, 60), args, amqp.Message(body, **properties))
    return b''.join(conn.transport.written)


def consumer_on_channel_1():
    """A connection whose channel 1 has consumer ``t1``; returns it and the list its
    deliveries go to."""
    conn = FakeConnection()
    conn.channels[1] = FakeChannel()
    got = []
    conn.channels[1].callbacks['t1'] = got.append
    return conn, got


@pytest.mark.parametrize('split', [1, 3, 7, 50, 100000])
def test_deliveries_are_parsed_from_any_split(split):
    conn, got = consumer_on_channel_1()
    stream = (deliver_frames(1, 't1', 5, b'{"a": 1}', {'correlation_id': 'c1',
                                                      'application_headers': {'x': 'y'}})
              + deliver_frames(1, 't1', 6, b'', {}, redelivered=True)
              + b'\x08\x00\x00\x00\x00\x00\x00\xce'  # heartbeat
              + deliver_frames(1, 't1', 7, b'z' * 10000, {}, frame_max=4096))
    conn.transport.sock.chunks = [stream[i:i + split] for i in range(0, len(stream), split)]
    fast = make_fast(conn)
    while conn.transport.sock.chunks:
        try:
            fast.drain(0)
        except socket.timeout:
            break
    assert [(m.delivery_tag, m.body[:8], m.delivery_info['redelivered']) for m in got] == [
        (5, b'{"a": 1}', False), (6, b'', True), (7, b'z' * 8, False)]
    assert isinstance(got[0], Delivered)
    assert got[0].properties['correlation_id'] == 'c1'
    assert got[0].headers == {'x': 'y'}
    assert got[0].delivery_info['routing_key'] == 'rk'
    assert len(got[2].body) == 10000
    assert conn.bytes_recv > 0


def test_ask_writes_then_returns_the_awaited_message_undispatched():
    conn, got = consumer_on_channel_1()
    reply = deliver_frames(1, 't1', 3, b'{"a": 1}', {'correlation_id': 'c1'})
    conn.transport.sock.chunks = [b'\x08\x00\x00\x00\x00\x00\x00\xce' + reply]  # heartbeat first
    fast = make_fast(conn)
    method, header, body = fast.ask(b'request frames', monotonic() + 1, lambda: False,
                                    (b'\x02t1',))
    assert conn.transport.written == [b'request frames']
    assert conn.bytes_sent == 1
    assert got == []                      # not given to the consumer's callback
    assert body == b'{"a": 1}'
    assert Delivered(body, decode_properties(header, 12, len(header)), None, None,
                     method).delivery_info['delivery_tag'] == 3
    assert decode_properties(header, 12, len(header))['correlation_id'] == 'c1'
    with pytest.raises(socket.timeout):   # nothing more comes
        fast.ask(b'again', monotonic() + 0.01, lambda: False, (b'\x02t1',))
    assert conn.transport.written[-1] == b'again'


def test_ask_dispatches_other_consumers_messages_on_the_way():
    conn, got = consumer_on_channel_1()
    conn.channels[1].callbacks['other'] = got.append
    conn.transport.sock.chunks = [deliver_frames(1, 'other', 1, b'{"o": 1}', {})
                                  + deliver_frames(1, 't1', 2, b'{"a": 1}', {})]
    fast = make_fast(conn)
    method, header, body = fast.ask(None, monotonic() + 1, lambda: False, (b'\x02t1',))
    assert (body, [m.body for m in got]) == (b'{"a": 1}', [b'{"o": 1}'])
    assert conn.transport.written == []   # None: nothing to write


@pytest.mark.parametrize('split', [1, 5, 40])
def test_ask_on_a_message_that_comes_in_pieces_dispatches_it_and_stops_when_done(split):
    conn, got = consumer_on_channel_1()
    stream = deliver_frames(1, 't1', 3, b'{"a": 1}', {'correlation_id': 'c1'})
    conn.transport.sock.chunks = [stream[i:i + split] for i in range(0, len(stream), split)]
    fast = make_fast(conn)
    assert fast.ask(b'request', monotonic() + 1, lambda: bool(got), (b'\x02t1',)) is None
    assert [(m.body, m.properties['correlation_id'], m.delivery_tag) for m in got] == [
        (b'{"a": 1}', 'c1', 3)]
    assert got[0].delivery_info['exchange'] == 'ex'   # decoded when first read


def test_other_frames_go_to_py_amqp_and_unknown_consumers_are_requeued():
    conn = FakeConnection()
    channel = FakeChannel()
    conn.channels[2] = channel
    ack = b'\x01\x00\x02\x00\x00\x00\x0d\x00\x3c\x00\x50' + (9).to_bytes(8, 'big') + \
        b'\x00\xce'  # basic.ack tag 9 on channel 2
    conn.transport.sock.chunks = [ack + deliver_frames(2, 'gone', 11, b'{}', {})]
    fast = make_fast(conn)
    fast.drain(0)
    assert conn.methods[0][:2] == (2, (60, 80))
    assert channel.rejected == [(11, True)]


def test_read_frame_for_py_amqp_never_splits_a_frame():
    conn = FakeConnection()
    fast = make_fast(conn)
    frames = deliver_frames(1, 't', 1, b'{}', {})
    conn.transport.sock.chunks = [frames[:5]]
    with pytest.raises(socket.timeout):
        fast._read_frame()
    conn.transport.sock.chunks = [frames[5:]]
    assert fast._read_frame()[:2] == (1, 1)   # the whole method frame, nothing lost
    assert fast._read_frame()[0] == 2
    assert fast._read_frame()[0] == 3


def test_ack_and_reject_frames():
    conn = FakeConnection()
    fast = make_fast(conn)
    fast.ack(3, 42)
    fast.reject(3, 43)
    fast.reject(3, 44, requeue=True)
    handler_conn = FakeConnection()
    for data in conn.transport.written:
        handler_conn.transport.sock.chunks = [data]
        parser = make_fast(handler_conn)
        parser.drain(0)
    sigs = [(c, sig) for c, sig, _ in handler_conn.methods]
    assert sigs == [(3, (60, 80)), (3, (60, 90)), (3, (60, 90))]
    counts = defaultdict(int)
    for data in conn.transport.written:
        counts[data[-2]] += 1
    assert counts == {0: 2, 1: 1}  # the last argument octet: multiple/requeue bits


def test_probe_is_a_passive_declare_py_amqp_would_send():
    conn = FakeConnection()
    fast = make_fast(conn)
    fast.probe(4)
    reference = FakeConnection()
    write = frame_writer(reference, reference.transport)
    write(1, 4, (40, 10), amqp.serialization.dumps(
        'BssbbbbbF', (0, 'amq.direct', 'direct', True, False, False, False, False, {})), None)
    assert conn.transport.written == reference.transport.written


@pytest.mark.parametrize('split', [5, 100000])
@pytest.mark.parametrize('case', CASES)
def test_delivered_properties_are_py_amqps(case, split):
    _, _, _, body, properties, headers, _ = case
    props = dict(properties, application_headers=headers) if headers else dict(properties)
    stream = deliver_frames(1, 't', 1, body, props)
    header_payload = stream[stream.index(b'\xce') + 8:]
    expected, _ = amqp.serialization.decode_properties_basic(header_payload, 12)
    conn = FakeConnection()
    channel = FakeChannel()
    conn.channels[1] = channel
    got = []
    channel.callbacks['t'] = got.append
    conn.transport.sock.chunks = [stream[i:i + split] for i in range(0, len(stream), split)]
    fast = make_fast(conn)
    while conn.transport.sock.chunks:
        fast.drain(0)
    assert [(m.body, m.properties) for m in got] == [(body, expected)]
    assert set(expected) == set(props)
