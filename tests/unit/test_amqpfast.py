"""The lean frame path writes what py-amqp writes and reads what py-amqp reads.

Reads run on a real py-amqp connection over loopback TCP (and TLS), see amqp_pair.
"""

from .amqp_pair import HEARTBEAT, Pair, deliver_frames, pyamqp_frames  # noqa: I100 (patch first)

import socket
from time import monotonic

import amqp
import pytest

from kazoo_green._amqpfast import encode_publish, encode_request
from kazoo_green._deliver import Delivered, decode_properties


def pyamqp_publish_bytes(frame_max, channel_id, exchange, routing_key, body, properties,
                         headers, mandatory):
    props = dict(properties)
    if headers:
        props['application_headers'] = headers
    args = amqp.serialization.dumps('Bssbb', (0, exchange, routing_key, mandatory, False))
    return pyamqp_frames(frame_max, channel_id, (60, 40), args, amqp.Message(body, **props))


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


TRANSPORTS = [pytest.param(False, id='tcp'), pytest.param(True, id='tls')]


def feed(pair, stream, split, until):
    """Send ``stream`` in pieces of ``split`` bytes, reading what has arrived after each
    (the reads see frames cut anywhere), then read until ``until()``."""
    fast = pair.fast
    for i in range(0, len(stream), split):
        pair.send(stream[i:i + split])
        while fast._poller.poll(0) or (fast.tls and fast.sock.pending()):
            fast._fill(1)
        fast._frames()
    deadline = monotonic() + 10
    while not until() and monotonic() < deadline:
        try:
            fast.drain(1)
        except socket.timeout:
            pass


@pytest.mark.parametrize('tls', TRANSPORTS)
@pytest.mark.parametrize('split', [1, 7, 50, 100000])
def test_deliveries_are_parsed_from_any_split(split, tls):
    pair = Pair(tls=tls)
    got = pair.consume(1, 't1')
    stream = (deliver_frames(1, 't1', 5, b'{"a": 1}', {'correlation_id': 'c1',
                                                      'application_headers': {'x': 'y'}})
              + deliver_frames(1, 't1', 6, b'', {}, redelivered=True)
              + HEARTBEAT
              + deliver_frames(1, 't1', 7, b'z' * 10000, {}, frame_max=4096))
    feed(pair, stream, split, lambda: len(got) == 3)
    assert [(m.delivery_tag, m.body[:8], m.delivery_info['redelivered']) for m in got] == [
        (5, b'{"a": 1}', False), (6, b'', True), (7, b'z' * 8, False)]
    assert isinstance(got[0], Delivered)
    assert got[0].properties['correlation_id'] == 'c1'
    assert got[0].headers == {'x': 'y'}
    assert got[0].delivery_info['routing_key'] == 'rk'
    assert len(got[2].body) == 10000
    assert all(m.bad is None for m in got)
    assert pair.conn.bytes_recv > 0
    pair.close()


@pytest.mark.parametrize('tls', TRANSPORTS)
def test_ask_writes_then_returns_the_awaited_message_undispatched(tls):
    pair = Pair(tls=tls)
    got = pair.consume(1, 't1')
    reply = deliver_frames(1, 't1', 3, b'{"a": 1}', {'correlation_id': 'c1'})
    pair.send(HEARTBEAT + reply)   # a heartbeat first
    method, header, body = pair.fast.ask(b'request frames', monotonic() + 5, lambda: False,
                                         (b'\x02t1',))
    assert pair.received(len(b'request frames')) == b'request frames'
    assert pair.conn.bytes_sent == 1
    assert got == []                      # not given to the consumer's callback
    assert body == b'{"a": 1}'
    properties, bad = decode_properties(header, 12, len(header))
    assert bad is None and properties['correlation_id'] == 'c1'
    assert Delivered(body, properties, None, method).delivery_info['delivery_tag'] == 3
    with pytest.raises(socket.timeout):   # nothing more comes
        pair.fast.ask(b'again', monotonic() + 0.01, lambda: False, (b'\x02t1',))
    assert pair.received(5) == b'again'
    pair.close()


def test_ask_dispatches_other_consumers_messages_on_the_way():
    pair = Pair()
    got = pair.consume(1, 't1')
    other = pair.consume(1, 'other')
    pair.send(deliver_frames(1, 'other', 1, b'{"o": 1}', {})
              + deliver_frames(1, 't1', 2, b'{"a": 1}', {}))
    method, header, body = pair.fast.ask(None, monotonic() + 5, lambda: False, (b'\x02t1',))
    assert (body, [m.body for m in other], got) == (b'{"a": 1}', [b'{"o": 1}'], [])
    assert pair.conn.bytes_sent == 0   # None: nothing written
    pair.close()


@pytest.mark.parametrize('split', [1, 5, 40])
def test_ask_on_a_message_that_comes_in_pieces_dispatches_it_and_stops_when_done(split):
    pair = Pair(blocking=False)
    got = pair.consume(1, 't1')
    stream = deliver_frames(1, 't1', 3, b'{"a": 1}', {'correlation_id': 'c1'})

    def broker():
        for i in range(0, len(stream), split):
            pair.send(stream[i:i + split])
            gevent.sleep(0.001)

    import gevent
    job = gevent.spawn(broker)
    assert pair.fast.ask(b'request', monotonic() + 5, lambda: bool(got), (b'\x02t1',)) is None
    job.join()
    assert [(m.body, m.properties['correlation_id'], m.delivery_tag) for m in got] == [
        (b'{"a": 1}', 'c1', 3)]
    assert got[0].delivery_info['exchange'] == 'ex'   # decoded when first read
    pair.close()


def test_other_frames_go_to_py_amqp_and_unknown_consumers_are_requeued():
    pair = Pair()
    acked = []
    channel = pair.channel(2)
    channel.events['basic_ack'].add(lambda tag, multiple: acked.append(tag))
    channel._confirm_selected = True   # py-amqp only dispatches acks on a confirm channel
    ack = b'\x01\x00\x02\x00\x00\x00\x0d\x00\x3c\x00\x50' + (9).to_bytes(8, 'big') + \
        b'\x00\xce'  # basic.ack tag 9 on channel 2
    pair.send(ack + deliver_frames(2, 'gone', 11, b'{}', {}))
    pair.pump()
    assert acked == [9]
    reject = pyamqp_frames(131072, 2, (60, 90), amqp.serialization.dumps('Lb', (11, True)))
    assert pair.received(len(reject)) == reject   # nobody consumes 'gone': requeued
    pair.close()


def test_read_frame_for_py_amqp_never_splits_a_frame():
    pair = Pair(blocking=False)
    frames = deliver_frames(1, 't', 1, b'{}', {})
    pair.send(frames[:5])
    pair.conn.transport.sock.settimeout(0.05)
    with pytest.raises(socket.timeout):
        pair.fast._read_frame()
    pair.send(frames[5:])
    assert pair.fast._read_frame()[:2] == (1, 1)   # the whole method frame, nothing lost
    assert pair.fast._read_frame()[0] == 2
    assert pair.fast._read_frame()[0] == 3
    pair.close()


def test_what_py_amqp_read_ahead_is_read_first():
    frames = deliver_frames(1, 't', 1, b'{"x": 1}', {})
    pair = Pair(read_ahead=frames[:9])
    got = pair.consume(1, 't')
    pair.send(frames[9:])
    pair.pump()
    assert [m.body for m in got] == [b'{"x": 1}']
    pair.close()


@pytest.mark.parametrize('tls', TRANSPORTS)
def test_ack_and_reject_frames(tls):
    pair = Pair(tls=tls)
    pair.fast.ack(3, 42)
    pair.fast.ack(3, 45, multiple=True)
    pair.fast.reject(3, 43)
    pair.fast.reject(3, 44, requeue=True)
    expected = b''.join([
        pyamqp_frames(131072, 3, (60, 80), amqp.serialization.dumps('Lb', (42, False))),
        pyamqp_frames(131072, 3, (60, 80), amqp.serialization.dumps('Lb', (45, True))),
        pyamqp_frames(131072, 3, (60, 90), amqp.serialization.dumps('Lb', (43, False))),
        pyamqp_frames(131072, 3, (60, 90), amqp.serialization.dumps('Lb', (44, True)))])
    assert pair.received(len(expected)) == expected
    pair.close()


def test_probe_is_a_passive_declare_py_amqp_would_send():
    pair = Pair()
    pair.fast.probe(4)
    expected = pyamqp_frames(131072, 4, (40, 10), amqp.serialization.dumps(
        'BssbbbbbF', (0, 'amq.direct', 'direct', True, False, False, False, False, {})))
    assert pair.received(len(expected)) == expected
    pair.close()


def test_a_big_write_waits_for_the_socket_to_drain():
    pair = Pair()
    data = b'x' * (8 << 20)
    import gevent
    reader = gevent.spawn(pair.received, len(data), 30)
    gevent.sleep(0)
    pair.fast.blocking = False   # let the reading greenlet run meanwhile
    pair.fast.send(data)
    assert reader.get(timeout=30) == data
    pair.close()


@pytest.mark.parametrize('split', [5, 100000])
@pytest.mark.parametrize('case', CASES)
def test_delivered_properties_are_py_amqps(case, split):
    _, _, _, body, properties, headers, _ = case
    props = dict(properties, application_headers=headers) if headers else dict(properties)
    stream = deliver_frames(1, 't', 1, body, props)
    header_payload = stream[stream.index(b'\xce') + 8:]
    expected, _ = amqp.serialization.decode_properties_basic(header_payload, 12)
    pair = Pair()
    got = pair.consume(1, 't')
    feed(pair, stream, split, lambda: got)
    assert [(m.body, m.properties, m.bad) for m in got] == [(body, expected, None)]
    pair.close()
    assert set(expected) == set(props)
