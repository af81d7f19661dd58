"""Deliveries are assembled by kazoo_green's frame handler, with or without FastPath, and a
message whose properties or routing key cannot be decoded arrives marked ``bad`` instead
of breaking the frame stream."""

from .amqp_pair import HEARTBEAT, Pair, deliver_frames, pyamqp_frames  # noqa: I100

import socket
import struct

import amqp
import pytest

from kazoo_green._deliver import decode_properties, delivery_info

MODES = [pytest.param(True, id='fastpath'), pytest.param(False, id='py-amqp-reads')]


def raw_deliver(channel_id, tag, delivery_tag, body, header_payload, exchange=b'ex',
                routing_key=b'rk'):
    """basic.deliver + a content header whose property bytes are ``header_payload``
    (after class/weight/size) + one body frame, built by hand (anything goes)."""
    def frame(kind, payload):
        return struct.pack('>BHI', kind, channel_id, len(payload)) + payload + b'\xce'
    method = (struct.pack('>HH', 60, 60) + bytes([len(tag)]) + tag
              + struct.pack('>QB', delivery_tag, 0) + bytes([len(exchange)]) + exchange
              + bytes([len(routing_key)]) + routing_key)
    header = struct.pack('>HHQ', 60, 0, len(body)) + header_payload
    return frame(1, method) + frame(2, header) + (frame(3, body) if body else b'')


def short(flag, value):
    return struct.pack('>H', flag) + bytes([len(value)]) + value


def read_all(pair, fast, until):
    for _ in range(50):
        if until():
            return
        if fast:
            try:
                pair.fast.drain(1)
            except socket.timeout:
                pass
        else:
            pair.conn.drain_events(timeout=1)


BAD = [   # name, property bytes, why it is bad, what is decoded still
    ('content_type not UTF-8', short(0x8000, b'\xff\xfeapplication/json'),
     'content_type is not UTF-8', {}),
    ('correlation_id not UTF-8 after a good reply_to',
     struct.pack('>H', 0x0600) + b'\x04abc\xc3' + b'\x01q', 'correlation_id is not UTF-8',
     {'reply_to': 'q'}),
    ('content_type not UTF-8, correlation_id good',
     struct.pack('>H', 0x8400) + b'\x01\x80' + b'\x02c1', 'content_type is not UTF-8',
     {'correlation_id': 'c1'}),
    ('content_type not UTF-8 beside headers',
     struct.pack('>H', 0xa000) + b'\x02\xff\xfe' + struct.pack('>I', 0),
     'content_type is not UTF-8', {'application_headers': {}}),
    ('headers truncated', struct.pack('>HI', 0x2000, 400) + b'\x01k',
     'properties cannot be decoded', {}),
    ('headers of unknown type, correlation_id good',
     struct.pack('>HI', 0x2400, 4) + b'\x01kZ\x00' + b'\x02c1', 'headers cannot be decoded',
     {'correlation_id': 'c1'}),
    ('headers with a timestamp Python cannot hold',
     struct.pack('>HI', 0x2000, 11) + b'\x01kT' + b'\xff' * 8, 'headers cannot be decoded',
     {}),
    ('properties truncated', struct.pack('>H', 0x8000) + b'\x20abc',
     'properties cannot be decoded', {}),
    ('flags continue', struct.pack('>H', 0x8001) + b'\x00\x00', 'flags continue', {}),
]


@pytest.mark.parametrize('fast', MODES)
@pytest.mark.parametrize('name,props,why,decoded', BAD, ids=[b[0] for b in BAD])
def test_undecodable_properties_arrive_bad_and_the_stream_goes_on(name, props, why, decoded,
                                                                  fast):
    pair = Pair(fast=fast)
    got = pair.consume(1, 't')
    pair.send(raw_deliver(1, b't', 1, b'{"a": 1}', props)
              + deliver_frames(1, 't', 2, b'{"b": 2}', {'content_type': 'application/json'}))
    read_all(pair, fast, lambda: len(got) == 2)
    assert [(m.delivery_tag, m.body, bool(m.bad)) for m in got] == [
        (1, b'{"a": 1}', True), (2, b'{"b": 2}', False)], got[0].bad
    assert why in got[0].bad
    assert got[0].properties == decoded
    pair.close()


@pytest.mark.parametrize('fast', MODES)
def test_headers_not_utf8_arrive_as_py_amqp_gives_them(fast):
    """py-amqp keeps a table key or long string that is not UTF-8 as bytes: usable."""
    pair = Pair(fast=fast)
    got = pair.consume(1, 't')
    pair.send(raw_deliver(1, b't', 1, b'{}', struct.pack('>HI', 0x2000, 8)
                          + b'\x02\xff\xfeS\x00\x00\x00\x00')
              + raw_deliver(1, b't', 2, b'{}', struct.pack('>HI', 0x2000, 9)
                            + b'\x01kS\x00\x00\x00\x02\xff\xfe'))
    read_all(pair, fast, lambda: len(got) == 2)
    assert [(m.headers, m.bad) for m in got] == [({b'\xff\xfe': ''}, None),
                                                 ({'k': b'\xff\xfe'}, None)]
    pair.close()


def test_deep_headers_table_is_bad_not_a_recursion_error():
    table = b''
    for _ in range(3000):   # a table in a table ... deeper than Python's recursion limit
        inner = b'\x01kF' + struct.pack('>I', len(table)) + table
        table = inner
    props, bad = decode_properties(struct.pack('>HI', 0x2000, len(table)) + table, 0,
                                   6 + len(table))
    assert props == {} and 'RecursionError' in bad, bad


@pytest.mark.parametrize('fast', MODES)
def test_routing_key_or_exchange_not_utf8_is_bad_with_its_bytes_escaped(fast):
    pair = Pair(fast=fast)
    got = pair.consume(1, 't')
    pair.send(raw_deliver(1, b't', 1, b'{}', b'\x00\x00', routing_key=b'a.\xff.b')
              + raw_deliver(1, b't', 2, b'{}', b'\x00\x00', exchange=b'\xc3('))
    read_all(pair, fast, lambda: len(got) == 2)
    assert got[0].bad is None   # decoded when delivery_info is first read
    assert got[0].delivery_info['routing_key'] == 'a.\\xff.b'
    assert got[0].bad == 'routing key is not UTF-8'
    assert got[1].delivery_info['exchange'] == '\\xc3('
    assert got[1].bad == 'exchange is not UTF-8'
    assert [m.delivery_tag for m in got] == [1, 2]
    pair.close()


def test_delivery_info_is_py_amqps():
    frames = deliver_frames(1, 'tag', 77, b'{}', {}, exchange='ex\u00e9', routing_key='k.\u00e9',
                            redelivered=True)
    size = struct.unpack_from('>I', frames, 3)[0]
    info, bad = delivery_info(frames[7:7 + size])
    assert bad is None
    assert info == {'consumer_tag': 'tag', 'delivery_tag': 77, 'redelivered': True,
                    'exchange': 'ex\u00e9', 'routing_key': 'k.\u00e9'}


@pytest.mark.parametrize('fast', MODES)
def test_frames_out_of_order_are_a_protocol_error(fast):
    pair = Pair(fast=fast)
    pair.consume(1, 't')
    frames = deliver_frames(1, 't', 1, b'{"a": 1}', {})
    method_end = 8 + struct.unpack_from('>I', frames, 3)[0]
    body_frame = frames[frames.index(b'\xce', method_end) + 1:]
    pair.send(frames[:method_end] + body_frame)   # a body where the header must be
    with pytest.raises(amqp.exceptions.UnexpectedFrame):
        read_all(pair, fast, lambda: False)
    pair.close()


@pytest.mark.parametrize('fast', MODES)
def test_other_methods_and_heartbeats_still_reach_py_amqp(fast):
    pair = Pair(fast=fast)
    blocked = pyamqp_frames(131072, 0, (10, 60), amqp.serialization.dumps('s', ('low memory',)))
    pair.send(HEARTBEAT + blocked)
    read_all(pair, fast, lambda: pair.blocked)
    assert len(pair.blocked) == 1
    pair.close()
