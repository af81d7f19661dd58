"""Hostile inputs against the real RabbitMQ (a fuzz test of poison messages).

Whatever a message holds -- body, properties, headers, routing key, size, nesting -- it
is either handled, or logged once with context, counted and rejected (dead-lettered
here: every consumer queue has a DLX), and never drops a connection, loops, stalls a
worker or a prefetch slot, or grows memory without bound. The same for query replies:
the query fails with a clear KazooError (or returns the reply, where its body is fine)
and the next query works, in both a caller-driven (``blocking=True``, never started: the
SIP-worker lane) and a started runtime.

Hostile messages are published raw: the frames are built here (``publish_frames``), not
by kazoo_green or py-amqp, so nothing validates or re-encodes them on the way out, and
each publish waits for the broker's confirm (a case the broker refuses would fail as
"refused by the broker", not pass unnoticed). What RabbitMQ 3.10 itself refuses (so it
can never reach a consumer) is pinned by ``test_broker_refuses_it``.

How a consumer case is judged (``test_hostile_message``): a fresh runtime consumes a
fresh queue with ``ack='late'``, ``prefetch=1`` and a DLX. The hostile message goes in,
then a good "probe" message. With one prefetch slot the broker delivers the probe only
once the hostile message is settled, so "the probe is handled" proves the slot was
given back; a reader that crashed shows up as a lost connection (``connection_errors``)
and ends the wait at once. Then: the connection was never lost, exactly two messages
were consumed (no redelivery loop), the hostile one was either handled once by the
route or counted as ``bad_input``, rejected, logged once (naming its queue) and found
byte for byte in the dead-letter queue; and after the runtime stopped, nothing is left
in its queue (an unsettled message would have gone back there).

``python -m tests.integration.test_poison responder EXCHANGE`` runs the responder that
answers queries with the hostile replies of REPLY_CASES (a process of its own: the
blocking caller blocks this whole process while it waits).
"""

import kazoo_green  # noqa: F401  (patches gevent before kombu/py-amqp are imported)

import gc
import logging
import os
import socket
import subprocess
import sys
import tracemalloc
from struct import pack, unpack_from

import amqp
import pytest
import simplejson
from amqp import spec

from kazoo_green import KazooError, QueryTimeout

from ..conftest import RABBIT_URL, unique, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HOST = '127.0.0.1:5672'
INVALID = b'\xff\xfe\xc3('          # not UTF-8 (a bad start byte, a cut sequence)
SURROGATE = b'\xed\xa0\x80'         # U+D800 as UTF-8 bytes (CESU): not valid UTF-8
PROBE_TIMEOUT = 5.0                 # seconds a good message may take after a hostile one


# -- frames, built by hand ----------------------------------------------------

def shortstr(value):
    data = value.encode('utf-8') if isinstance(value, str) else bytes(value)
    assert len(data) <= 255, 'short string of %d bytes' % len(data)
    return bytes((len(data),)) + data


def longstr(value):
    data = value.encode('utf-8') if isinstance(value, str) else bytes(value)
    return pack('>I', len(data)) + data


def frame(frame_type, channel, payload):
    return pack('>BHI', frame_type, channel, len(payload)) + payload + b'\xce'


class Field(bytes):
    """A field value already encoded (type letter included), for table()."""


def field(value):
    if isinstance(value, Field):
        return bytes(value)
    if isinstance(value, bool):
        return b't' + bytes((int(value),))
    if isinstance(value, int):
        return b'l' + pack('>q', value)
    if isinstance(value, float):
        return b'd' + pack('>d', value)
    if isinstance(value, (str, bytes)):
        return b'S' + longstr(value)
    if isinstance(value, dict):
        return b'F' + table(value)
    if isinstance(value, list):
        data = b''.join(field(v) for v in value)
        return b'A' + pack('>I', len(data)) + data
    if value is None:
        return b'V'
    raise TypeError(value)


def table(items):
    """An AMQP field table; keys may be bytes (any bytes)."""
    data = b''.join(shortstr(k) + field(v) for k, v in items.items())
    return pack('>I', len(data)) + data


def deep_table(depth):
    """{'a': {'a': ... 'x'}} ``depth`` tables deep, built without recursion."""
    value = field('x')
    for _ in range(depth):
        inner = shortstr('a') + value
        value = b'F' + pack('>I', len(inner)) + inner
    return Field(value)


def deep_array(depth):
    value = field('x')
    for _ in range(depth):
        value = b'A' + pack('>I', len(value)) + value
    return Field(value)


# Basic properties in wire order: (name, flag, kind); 'F' is the headers table.
PROPERTIES = (
    ('content_type', 0x8000, 's'), ('content_encoding', 0x4000, 's'),
    ('headers', 0x2000, 'F'), ('delivery_mode', 0x1000, 'B'), ('priority', 0x0800, 'B'),
    ('correlation_id', 0x0400, 's'), ('reply_to', 0x0200, 's'), ('expiration', 0x0100, 's'),
    ('message_id', 0x0080, 's'), ('timestamp', 0x0040, 'Q'), ('type', 0x0020, 's'),
    ('user_id', 0x0010, 's'), ('app_id', 0x0008, 's'), ('cluster_id', 0x0004, 's'))


def publish_frames(channel, exchange, routing_key, body, props, frame_max):
    """basic.publish + content header + body frames; short strings may be any bytes,
    ``props['headers']`` a dict (see table) or the encoded table."""
    flags, parts = 0, []
    for name, bit, kind in PROPERTIES:
        if name not in props:
            continue
        value = props[name]
        flags |= bit
        if kind == 's':
            parts.append(shortstr(value))
        elif kind == 'B':
            parts.append(bytes((value,)))
        elif kind == 'Q':
            parts.append(pack('>Q', value))
        else:
            parts.append(value if isinstance(value, bytes) else table(value))
    header = pack('>HHQH', 60, 0, len(body), flags) + b''.join(parts)
    assert len(header) + 8 <= frame_max, 'content header larger than a frame'
    out = [frame(1, channel, pack('>HHH', 60, 40, 0) + shortstr(exchange)
                 + shortstr(routing_key) + b'\x00'),
           frame(2, channel, header)]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        out.append(frame(3, channel, body[start:start + chunk]))
    return b''.join(out)


class Refused(Exception):
    """The broker closed the channel or the connection instead of taking a message."""


def _connect():
    conn = amqp.Connection(HOST, userid='guest', password='guest')
    conn.connect()
    return conn


class RawBroker(object):
    """Publishes hand-built frames on a confirm channel and waits for their confirms."""

    def __init__(self):
        self._open()

    def _open(self):
        self.conn = _connect()
        self.channel = self.conn.channel()
        self.channel.confirm_select()
        self.seq = 0            # delivery tags of this channel's publishes
        self.upto = 0           # every tag up to this one is confirmed (a 'multiple' ack)
        self.single = set()     # tags confirmed one by one
        self.nacked = set()
        self.channel.events['basic_ack'].add(self._on_confirm)
        self.channel.events['basic_nack'].add(lambda tag, multiple: self._on_confirm(
            tag, multiple, nack=True))

    def _on_confirm(self, tag, multiple, nack=False):
        if nack:
            self.nacked.update(range(self.upto + 1, tag + 1) if multiple else (tag,))
        if multiple:
            self.upto = max(self.upto, tag)
        else:
            self.single.add(tag)

    def _reset(self):
        try:
            self.conn.collect()
        except Exception:
            pass
        self._open()

    def _until(self, done):
        try:
            while not done():
                self.conn.drain_events(timeout=30)
        except Exception as exc:  # closed by the broker (its reason may not be UTF-8)
            self._reset()
            raise Refused('%s: %s' % (type(exc).__name__, exc)) from None

    def publish(self, exchange, routing_key, body, props=None, confirm=True):
        """Write the frames; with ``confirm``, wait until the broker confirmed every
        publish so far (Refused if it closed the channel or nacked this one)."""
        self.conn.transport.write(publish_frames(self.channel.channel_id, exchange,
                                                 routing_key, body, props or {},
                                                 self.conn.frame_max))
        self.seq += 1
        if confirm:
            seq = self.seq
            self._until(lambda: self.upto >= seq or seq in self.single)
            if seq in self.nacked:
                raise Refused('basic.nack')

    def declare(self, kind, name):
        """exchange.declare (fanout) or queue.declare (auto-delete) of ``name``, which
        may be any bytes."""
        if kind == 'exchange':
            method, answer = pack('>HH', 40, 10), spec.Exchange.DeclareOk
            args = pack('>H', 0) + shortstr(name) + shortstr('fanout') + b'\x00' + table({})
        else:
            method, answer = pack('>HH', 50, 10), spec.Queue.DeclareOk
            args = pack('>H', 0) + shortstr(name) + b'\x08' + table({})
        self.conn.transport.write(frame(1, self.channel.channel_id, method + args))
        try:
            self.channel.wait([answer], timeout=30)
        except Exception as exc:
            self._reset()
            raise Refused('%s: %s' % (type(exc).__name__, exc)) from None

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass


class Admin(object):
    """Declares, counts, reads and deletes queues and exchanges with plain py-amqp."""

    def __init__(self):
        self.conn = _connect()
        self._channel = self.conn.channel()

    @property
    def channel(self):
        if not self._channel.is_open:   # closed by an error of an earlier call
            self._channel = self.conn.channel()
        return self._channel

    def declare_dead_letters(self, dlx, dlq):
        self.channel.exchange_declare(dlx, 'fanout', auto_delete=False)
        self.channel.queue_declare(dlq, auto_delete=False)
        self.channel.queue_bind(dlq, dlx, '')

    def ready(self, queue):
        """Messages ready in ``queue`` (a passive declare)."""
        return self.channel.queue_declare(queue, passive=True).message_count

    def get_body(self, queue):
        """The body of the next message of ``queue`` (taken, no ack), or None if empty.

        Read frame by frame here: py-amqp would decode the properties, which are the
        hostile part of some messages."""
        channel = self.channel.channel_id
        self.conn.transport.write(frame(1, channel, pack('>HHH', 60, 70, 0) + shortstr(queue)
                                        + b'\x01'))
        transport = self.conn.transport
        with transport.having_timeout(10):
            frame_type, _, payload = transport.read_frame()
            assert frame_type == 1, frame_type
            class_id, method_id = unpack_from('>HH', payload)
            if (class_id, method_id) == (60, 72):
                return None
            assert (class_id, method_id) == (60, 71), (class_id, method_id)
            frame_type, _, payload = transport.read_frame()
            assert frame_type == 2, frame_type
            size = unpack_from('>Q', payload, 4)[0]
            chunks, got = [], 0
            while got < size:
                frame_type, _, payload = transport.read_frame()
                assert frame_type == 3, frame_type
                chunks.append(payload)
                got += len(payload)
        return b''.join(chunks)

    def delete(self, queues=(), exchanges=()):
        for q in queues:
            self.channel.queue_delete(q)
        for e in exchanges:
            self.channel.exchange_delete(e)

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass


@pytest.fixture(scope='module')
def raw():
    broker = RawBroker()
    yield broker
    broker.close()


@pytest.fixture(scope='module')
def admin():
    a = Admin()
    yield a
    a.close()


def js(value):
    return simplejson.dumps(value).encode('utf-8')


def kazoo_logs(records, since):
    """WARNING-or-worse records of the kazoo_green loggers from ``records[since:]``."""
    return [r for r in records[since:]
            if r.name.startswith('kazoo_green') and r.levelno >= logging.WARNING]


def describe_logs(records):
    if not records:
        return 'nothing logged'
    return '; '.join('%s %s%s' % (r.levelname, r.getMessage()[:300],
                                  ' [%s: %s]' % (r.exc_info[0].__name__, str(r.exc_info[1])[:200])
                                  if r.exc_info else '')
                     for r in records[:4]) + (' (+%d more)' % (len(records) - 4)
                                              if len(records) > 4 else '')


# -- consumer cases -------------------------------------------------------------

HANDLED, DEAD = 'handled', 'dead-lettered'
EITHER = (HANDLED, DEAD)


class Case(object):
    """One hostile message: what it is made of and the outcomes that are acceptable."""

    def __init__(self, name, body=None, outcome=EITHER, props=None, routing_key='fuzz.k',
                 sub=None, check=None, timeout=PROBE_TIMEOUT, note=''):
        self.name = name
        self._body = body
        self.outcomes = (outcome,) if isinstance(outcome, str) else outcome
        self._props = props
        self.routing_key = routing_key
        self.sub = sub or {}
        self.check = check
        self.timeout = timeout
        self.note = note

    def body(self):
        body = self._body
        if body is None:
            return js({'Event-Category': 'fuzz', 'Event-Name': self.name})
        return body() if callable(body) else body

    def props(self):
        props = self._props
        return dict(props() if callable(props) else props or {})

    def __repr__(self):
        return self.name


def event(**fields):
    payload = {'Event-Category': 'fuzz', 'Event-Name': 'x'}
    payload.update(fields)
    return js(payload)


def nested_array_field(depth):
    return (b'{"Event-Category":"fuzz","Event-Name":"deep","D":' + b'[' * depth + b'1'
            + b']' * depth + b'}')


def nested_object(depth, head=b''):
    return head + b'{"a":' * depth + b'1' + b'}' * depth + (b'}' if head else b'')


def expect_meta(attribute, fn):
    def check(payload, meta):
        assert fn(getattr(meta, attribute)), '%s is %r' % (attribute, getattr(meta, attribute))
    return check


_BIG = js({'Event-Category': 'fuzz', 'Event-Name': 'big', 'Pad': ''})


def valid_body(size):
    """A good event of exactly ``size`` bytes."""
    return _BIG[:-2] + b'p' * (size - len(_BIG)) + _BIG[-2:]


def pad_length(size):
    return lambda payload, meta: _assert_eq(len(payload['Pad']), size - len(_BIG),
                                            'Pad length')


def _assert_eq(got, want, what):
    assert got == want, '%s: %r != %r' % (what, got, want)


GOOD_PROPS = {'content_type': 'application/json', 'content_encoding': 'utf-8'}


def bad_prop(name, value=INVALID, with_headers=False):
    props = dict(GOOD_PROPS)
    props[name] = value
    if with_headers:
        props['headers'] = {'X-Fine': 'yes'}
    return props


CASES = [
    # -- body ----------------------------------------------------------------------
    Case('body-empty', b'', DEAD),
    Case('body-whitespace', b' \t\r\n ', DEAD),
    Case('body-not-utf8', b'{"Event-Category":"fuzz","Event-Name":"' + INVALID + b'"}', DEAD),
    Case('body-latin1', b'{"Event-Category":"caf\xe9","Event-Name":"x"}', DEAD),
    Case('body-surrogate-bytes', b'{"Event-Category":"fuzz","Event-Name":"' + SURROGATE + b'"}',
         DEAD),
    Case('body-escaped-lone-surrogate', b'{"Event-Category":"fuzz","Event-Name":"\\ud800"}'),
    Case('body-bom', b'\xef\xbb\xbf' + event()),
    Case('body-nul-bytes', b'\x00' + event() + b'\x00', DEAD),
    Case('body-escaped-nul', b'{"Event-Category":"fuzz\\u0000","Event-Name":"x\\u0000"}'),
    Case('body-truncated-json', b'{"Event-Category":"fuzz","Event-Name":', DEAD),
    Case('body-trailing-garbage', event() + b' garbage', DEAD),
    Case('body-two-objects', event() + event(), DEAD),
    Case('body-json-array', b'[{"Event-Category":"fuzz","Event-Name":"x"}]', DEAD),
    Case('body-json-string', b'"hello"', DEAD),
    Case('body-json-number', b'42', DEAD),
    Case('body-json-null', b'null', DEAD),
    Case('body-5000-digit-int',
         b'{"Event-Category":"fuzz","Event-Name":"x","N":' + b'9' * 5000 + b'}', DEAD,
         note='beyond int_max_str_digits: bad input, whatever the reason text'),
    Case('body-1e999', b'{"Event-Category":"fuzz","Event-Name":"x","N":1e999}'),
    Case('body-nan-literal', b'{"Event-Category":"fuzz","Event-Name":"x","N":NaN}'),
    Case('body-minus-infinity', b'{"Event-Category":"fuzz","Event-Name":"x","N":-Infinity}'),
    Case('body-duplicate-keys',
         b'{"Event-Category":"other","Event-Category":"fuzz","Event-Name":"x"}'),
    Case('body-huge-string', lambda: valid_body(5 * 1024 * 1024), HANDLED,
         check=pad_length(5 * 1024 * 1024)),
    Case('body-deep-array-100', nested_array_field(100), HANDLED),
    Case('body-deep-array-1000', nested_array_field(1000)),
    Case('body-deep-array-100000', nested_array_field(100000)),
    Case('body-open-brackets-100000', b'[' * 100000, DEAD),
    Case('body-deep-object-100', nested_object(100, b'{"Event-Category":"fuzz",'
                                                    b'"Event-Name":"deep","D":'), HANDLED),
    Case('body-deep-object-5000', nested_object(5000), DEAD),
    Case('body-deep-object-5000-with-keys',
         nested_object(5000, b'{"Event-Category":"fuzz","Event-Name":"deep","D":')),
    # Key fields missing or not scalar: routed to the fallbacks, as by the C module.
    Case('body-key-fields-missing', js({'Foo': 1}), HANDLED),
    Case('body-event-name-missing', js({'Event-Category': 'fuzz'}), HANDLED),
    Case('body-category-object', js({'Event-Category': {'a': 1}, 'Event-Name': 'x'}), HANDLED),
    Case('body-category-list', js({'Event-Category': ['fuzz'], 'Event-Name': 'x'}), HANDLED),
    Case('body-category-null', js({'Event-Category': None, 'Event-Name': 'x'}), HANDLED),
    Case('body-category-bool-name-float', js({'Event-Category': True, 'Event-Name': 1.5}),
         HANDLED),
    Case('body-category-empty', js({'Event-Category': '', 'Event-Name': ''}), HANDLED),
    Case('body-category-10kB', js({'Event-Category': 'c' * 10240, 'Event-Name': 'x'}), HANDLED,
         check=lambda payload, meta: _assert_eq(len(payload['Event-Category']), 10240,
                                                'Event-Category length')),
    Case('body-worker-key-not-scalar', event(From={'a': [1]}), HANDLED,
         sub={'worker_key': 'From'}),
    # -- properties ----------------------------------------------------------------
    Case('prop-content-type-invalid-utf8', props=bad_prop('content_type')),
    Case('prop-content-type-invalid-utf8-with-headers',
         props=bad_prop('content_type', with_headers=True)),
    Case('prop-content-encoding-invalid-utf8', props=bad_prop('content_encoding')),
    Case('prop-correlation-id-invalid-utf8', props=bad_prop('correlation_id')),
    Case('prop-reply-to-invalid-utf8', props=bad_prop('reply_to')),
    Case('prop-message-id-invalid-utf8', props=bad_prop('message_id')),
    Case('prop-message-id-invalid-utf8-with-headers',
         props=bad_prop('message_id', with_headers=True)),
    Case('prop-type-invalid-utf8', props=bad_prop('type')),
    Case('prop-app-id-invalid-utf8', props=bad_prop('app_id')),
    Case('prop-cluster-id-invalid-utf8', props=bad_prop('cluster_id')),
    Case('prop-surrogate-bytes', props=bad_prop('content_type', SURROGATE)),
    Case('prop-all-short-strings-invalid',
         props={name: INVALID for name, bit, kind in PROPERTIES
                if kind == 's' and name not in ('user_id', 'expiration')}),
    Case('prop-content-type-255-bytes', props=bad_prop('content_type', b'a' * 255),
         outcome=HANDLED),
    Case('prop-priority-255', props={'priority': 255}, outcome=HANDLED,
         check=expect_meta('properties', lambda p: p.get('priority') == 255)),
    Case('prop-timestamp-max', props={'timestamp': 2 ** 64 - 1}, outcome=HANDLED),
    # -- headers -------------------------------------------------------------------
    Case('hdr-key-invalid-utf8', props={'headers': {INVALID: 'v', 'ok': 'v'}}),
    Case('hdr-value-invalid-utf8', props={'headers': {'k': INVALID}}),
    Case('hdr-key-255-bytes', props={'headers': {'k' * 255: 1}}, outcome=HANDLED),
    Case('hdr-key-empty', props={'headers': {'': 1}}, outcome=HANDLED),
    Case('hdr-deep-table-100', props={'headers': {'d': deep_table(100)}}, outcome=HANDLED),
    Case('hdr-deep-table-5000', props={'headers': {'d': deep_table(5000)}}),
    Case('hdr-deep-array-5000', props={'headers': {'d': deep_array(5000)}}),
    Case('hdr-many-5000', props={'headers': {'h%d' % i: i for i in range(5000)}},
         outcome=HANDLED),
    Case('hdr-odd-types',
         props={'headers': {'decimal': Field(b'D\x02' + pack('>i', -12345)),
                            'decimal-scale-255': Field(b'D\xff' + pack('>i', 1)),
                            'void': None, 'bytes': Field(b'x' + longstr(b'\x00\xff')),
                            'float': Field(b'f' + pack('>f', 1.5)),
                            'short': Field(b's' + pack('>h', -5)),
                            'ushort': Field(b'u' + pack('>H', 5)), 'octet': Field(b'b\x85'),
                            'uint': Field(b'i' + pack('>I', 2 ** 32 - 1)),
                            'bool': True, 'timestamp': Field(b'T' + pack('>Q', 0)),
                            'big-bytes': Field(b'x' + longstr(INVALID * 10000))}},
         outcome=HANDLED),
    Case('hdr-timestamp-max', props={'headers': {'t': Field(b'T' + pack('>Q', 2 ** 64 - 1))}}),
    Case('hdr-x-death-garbage', js(['not an object']),
         DEAD, props={'headers': {'x-death': 'garbage', 'x-first-death-reason': INVALID}},
         note='the broker rewrites x-death when it dead-letters this one'),
    # -- routing key ---------------------------------------------------------------
    Case('rk-invalid-utf8', routing_key=b'fuzz.' + INVALID),
    Case('rk-surrogate-bytes', routing_key=b'fuzz.' + SURROGATE),
    Case('rk-invalid-utf8-bad-body', b'not json', DEAD, routing_key=b'fuzz.' + INVALID),
    Case('rk-invalid-utf8-worker-key', routing_key=b'fuzz.' + INVALID,
         sub={'worker_key': 'routing_key'}),
    Case('rk-255-bytes', routing_key='k' * 255, outcome=HANDLED,
         check=expect_meta('routing_key', lambda rk: rk == 'k' * 255)),
    Case('rk-empty', routing_key='', outcome=HANDLED),
    Case('rk-dots-only', routing_key='.....', outcome=HANDLED),
    # -- size ----------------------------------------------------------------------
    # frame_max is 131072 (RabbitMQ's default), so 131064 body bytes fill one frame.
    Case('size-one-full-frame', lambda: valid_body(131064), HANDLED, check=pad_length(131064)),
    Case('size-one-byte-over-a-frame', lambda: valid_body(131065), HANDLED,
         check=pad_length(131065)),
    Case('size-1MB', lambda: valid_body(1024 * 1024), HANDLED, check=pad_length(1024 * 1024)),
    Case('size-20MB', lambda: valid_body(20 * 1024 * 1024), HANDLED,
         check=pad_length(20 * 1024 * 1024), timeout=30),
    Case('size-1MB-not-json', b'{' + b'x' * (1024 * 1024), DEAD),
]

assert len(CASES) >= 40 and len(set(c.name for c in CASES)) == len(CASES)


@pytest.fixture
def topology(admin):
    """Unique names for one case; the dead-letter exchange and queue declared; all
    deleted afterwards."""
    names = {'exchange': unique('poison-ex'), 'queue': unique('poison-q'),
             'dlx': unique('poison-dlx'), 'dlq': unique('poison-dlq')}
    admin.declare_dead_letters(names['dlx'], names['dlq'])
    yield names
    admin.delete(queues=[names['queue'], names['dlq']],
                 exchanges=[names['exchange'], names['dlx']])


PROBE_PAYLOAD = {'Event-Category': 'probe', 'Event-Name': 'ok'}


# fast=False: py-amqp reads every frame (no FastPath); deliveries are still parsed by
# kazoo_green's frame handler, so both must hold up alike.
FRAME_PATHS = [pytest.param(True, id='fastpath'), pytest.param(False, id='py-amqp')]


@pytest.mark.parametrize('fast', FRAME_PATHS)
@pytest.mark.parametrize('case', CASES, ids=[c.name for c in CASES])
def test_hostile_message(case, fast, raw, admin, topology, runtimes, caplog):
    exchange, queue, dlq = topology['exchange'], topology['queue'], topology['dlq']
    kz = runtimes(RABBIT_URL, workers=2, poll_interval=0.02, fast=fast)
    assert (kz._sub_link.use_fast, kz._pub_link.use_fast) == (fast, fast)
    handled, probes = [], []

    @kz.event_route('kazoo:consumer-event')      # every fallback ends here ...
    def anything(payload, meta):
        if meta.queue == queue:                  # ... connection open/closed events too
            handled.append((payload, meta))

    kz.add_route('kazoo:consumer-event-probe-ok',
                 lambda payload, meta: probes.append(payload['Token']))
    kz.subscribe(exchange, '#', queue=queue, exchange_type='topic', auto_delete=False,
                 ack='late', prefetch=1,
                 queue_arguments={'x-dead-letter-exchange': topology['dlx']}, **case.sub)
    kz.start()
    assert kz.wait_connected(5), 'runtime did not connect'
    base = kz.stats()
    assert base['reconnects'] == base['connection_errors'] == 0, base
    mark = len(caplog.records)
    body = case.body()
    try:
        raw.publish(exchange, case.routing_key, body, case.props())
    except Refused as exc:
        pytest.fail('%s: the broker refused the hostile message (%s): move it to '
                    'test_broker_refuses_it' % (case.name, exc))
    token = unique('probe')
    raw.publish(exchange, 'probe', js(dict(PROBE_PAYLOAD, Token=token)), GOOD_PROPS)

    def lost():
        stats = kz.stats()
        return (stats['connection_errors'] > base['connection_errors']
                or stats['reconnects'] > base['reconnects'])

    wait_for(lambda: probes or lost(), timeout=case.timeout)
    stats = kz.stats()
    logs = kazoo_logs(caplog.records, mark)

    def failure(what):
        delta = {k: stats[k] - base[k] for k in ('consumed', 'acked', 'rejected', 'bad_input',
                                                 'handler_errors', 'ack_failed', 'connects',
                                                 'reconnects', 'connection_errors')}
        return '%s: %s [counters since start: %s; route handled %d hostile; logged: %s]%s' % (
            case.name, what, ', '.join('%s=%+d' % kv for kv in delta.items() if kv[1]),
            len(handled), describe_logs(logs), ' (%s)' % case.note if case.note else '')

    if lost():
        pytest.fail(failure('the consuming connection was lost (reader crashed; the message '
                            'would be redelivered in a loop)'))
    if not probes:
        pytest.fail(failure('a good message published after it was not handled within %.0fs '
                            '(a worker or the prefetch slot is stuck: the hostile message '
                            'was never acked or rejected)' % case.timeout))
    # The probe's ack is written after its handler returned.
    wait_for(lambda: kz.stats()['acked'] + kz.stats()['rejected']
             - base['acked'] - base['rejected'] >= 2, timeout=5)
    stats = kz.stats()
    consumed = stats['consumed'] - base['consumed']
    acked, rejected = stats['acked'] - base['acked'], stats['rejected'] - base['rejected']
    bad = stats['bad_input'] - base['bad_input']
    assert consumed == 2, failure('%d deliveries for 2 messages (redelivered?)' % consumed)
    assert stats['connects'] == base['connects'], failure('the runtime reconnected')
    assert acked + rejected == 2, failure('%d of 2 deliveries settled' % (acked + rejected))
    assert stats['handler_errors'] == base['handler_errors'], failure('a handler raised')
    errors = [r for r in logs if r.levelno >= logging.ERROR]

    if handled:
        outcome = HANDLED
        assert HANDLED in case.outcomes, failure('handled, but it must be dead-lettered')
        assert len(handled) == 1, failure('handled %d times' % len(handled))
        assert (acked, rejected, bad) == (2, 0, 0), failure('handled, but not just acked')
        assert not errors, failure('handled, but errors were logged')
        assert len(logs) <= 1, failure('handled, but logged %d times' % len(logs))
        if case.check:
            try:
                case.check(*handled[0])
            except AssertionError as exc:
                pytest.fail(failure('handled with the wrong content: %s' % exc))
    else:
        outcome = DEAD
        assert DEAD in case.outcomes, failure('not handled by its route (it is a message the '
                                              'route must get)')
        assert (acked, rejected, bad) == (1, 1, 1), failure(
            'not handled, so it must be counted as bad_input and rejected once')
        assert len(logs) == 1, failure('rejected, but logged %d times (once, with context)'
                                       % len(logs))
        assert queue in logs[0].getMessage(), failure('the log line does not name the queue')
        assert wait_for(lambda: admin.ready(dlq) == 1, timeout=5), failure(
            'rejected, but %d messages in the dead-letter queue' % admin.ready(dlq))
        assert admin.get_body(dlq) == body, failure('the dead-letter queue holds another body')
    kz.stop()
    # Stopped: a delivery never settled would be back in the queue now.
    left = admin.ready(queue)
    assert left == 0, failure('%s, yet %d messages are back in the queue after the runtime '
                              'stopped (never settled)' % (outcome, left))
    assert admin.ready(dlq) == 0, failure('more than one message dead-lettered')


# -- what the broker refuses (can never reach a consumer) -------------------------

REFUSED = [
    # (id, what is sent, its detail). A publish to an existing exchange with these
    # properties -- user_id must be the connection's user (guest); expiration a
    # non-negative integer below 2^32 in decimal; delivery_mode 1 or 2 -- is a 406
    # PRECONDITION_FAILED (the channel; its reason quotes the bytes, not always UTF-8).
    ('user-id-other', 'properties', {'user_id': 'nobody'}),
    ('user-id-invalid-utf8', 'properties', {'user_id': INVALID}),
    ('expiration-invalid-utf8', 'properties', {'expiration': INVALID}),
    ('expiration-negative', 'properties', {'expiration': '-1'}),
    ('expiration-not-integer', 'properties', {'expiration': '1.5'}),
    ('expiration-empty', 'properties', {'expiration': ''}),
    ('expiration-huge', 'properties', {'expiration': '9' * 20}),
    ('delivery-mode-255', 'properties', {'delivery_mode': 255}),
    # A header field type letter AMQP does not define, or a NaN or infinite float
    # (Erlang has none): 541 INTERNAL_ERROR, and the broker closes the connection.
    ('header-unknown-type', 'properties', {'headers': {'z': Field(b'Z')}}),
    ('header-double-nan', 'properties', {'headers': {'d': float('nan')}}),
    ('header-double-infinity', 'properties', {'headers': {'d': float('-inf')}}),
    ('header-float-nan', 'properties', {'headers': {'f': Field(b'f' + pack('>f',
                                                                         float('nan')))}}),
    # Exchange and queue names must be UTF-8: declaring one is a 501 FRAME_ERROR
    # "Malformed UTF-8 in shortstr" (the connection), so a basic.publish to one finds
    # no exchange (404 NOT_FOUND) and no delivery ever carries an exchange name that is
    # not UTF-8. Routing keys are not checked (see CASES).
    ('publish-to-exchange-invalid-utf8', 'publish-to', b'poison-' + INVALID),
    ('declare-exchange-invalid-utf8', 'declare-exchange', b'poison-' + INVALID),
    ('declare-queue-invalid-utf8', 'declare-queue', b'poison-' + INVALID),
]


@pytest.mark.parametrize('what,detail', [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_broker_refuses_it(raw, topology, what, detail):
    """Pins what RabbitMQ 3.10 refuses: should one ever be accepted, it belongs in CASES."""
    with pytest.raises(Refused):
        if what == 'properties':   # the DLX exists (fanout): only the properties are wrong
            raw.publish(topology['dlx'], 'k', event(), detail)
        elif what == 'publish-to':
            raw.publish(detail, 'k', event())
        else:
            raw.declare(what.split('-', 1)[1], detail)
    raw.publish(topology['dlx'], 'k', event())   # and the next publish is fine


# -- unrouted route names ---------------------------------------------------------

def test_unrouted_names_do_not_grow_memory(raw, topology, runtimes):
    """Distinct unrouted route names (3 × 2000 of 10 kB) must not be remembered without
    bound (the warn-once set kept 20 MB per 2000).

    Measured with tracemalloc (Python allocations still alive, after gc), not RSS: RSS
    moves with the allocator's whims; live allocations of this process are exact (the
    noise here is ~0.1 MB). What rounds 2 and 3 (4000 names, 41 MB of them) leave alive
    beyond what round 1 left is compared with half of their volume: keeping every name
    (today) leaves all 41 MB; any bounded memory of names -- full or not, cleared when
    full or least-recently-used -- differs between two moments by at most its bound, so
    it passes if that bound is below ~2000 names of this size (the issue's 20 MB). The
    kazoo_green log is not propagated meanwhile: pytest's log capture would keep every
    warning (and its 10 kB name) alive itself.
    """
    exchange, queue = topology['exchange'], topology['queue']
    kz = runtimes(RABBIT_URL, workers=2, poll_interval=0.02)
    kz.subscribe(exchange, '#', queue=queue, exchange_type='topic', auto_delete=False,
                 prefetch=50, queue_arguments={'x-dead-letter-exchange': topology['dlx']})
    logger = logging.getLogger('kazoo_green')
    counted = []

    class Count(logging.Handler):
        def emit(self, record):
            counted.append(record.levelno)

    handler = Count()
    propagate = logger.propagate
    logger.propagate = False
    logger.addHandler(handler)
    tracemalloc.start(1)
    try:
        kz.start()
        assert kz.wait_connected(5)
        base = kz.stats()
        published = 0

        def round_(n, size=10240):
            """Publish ``n`` distinct unrouted names; the live Python memory after."""
            nonlocal published
            for i in range(n):
                published += 1
                category = '%06d' % published + 'c' * (size - 6)
                raw.publish(exchange, 'k', js({'Event-Category': category, 'Event-Name': 'x'}),
                            confirm=i == n - 1)
            assert wait_for(lambda: kz.stats()['acked'] - base['acked'] == published,
                            timeout=60), 'not all unrouted messages acked: %r' % kz.stats()
            gc.collect()
            return tracemalloc.get_traced_memory()[0]

        round_(200, size=100)                    # warm up every code path and buffer
        first = round_(2000)
        round_(2000)
        third = round_(2000)
        stats = kz.stats()
        seen = getattr(kz._subscriber, '_unrouted_seen', None)   # today's warn-once set
        remembered = '' if seen is None else '; the warn-once set holds %d names' % len(seen)
    finally:
        tracemalloc.stop()
        logger.removeHandler(handler)
        logger.propagate = propagate
    assert stats['unrouted'] - base['unrouted'] == 6200, stats
    assert stats['connects'] == base['connects'] and stats['connection_errors'] == 0, stats
    growth = third - first
    assert growth < 4000 * 10240 / 2, (
        '4000 more distinct unrouted names (10 kB each, 41 MB) kept %.1f MB more alive '
        '(%d warnings logged in all%s)' % (growth / 1e6, len(counted), remembered))


# -- query replies ----------------------------------------------------------------

OK, ERROR, TIMEOUT = 'reply', 'KazooError', 'QueryTimeout'


class ReplyCase(object):
    """A hostile reply. ``style``: 'kazoo' (exchange targeted, routing key Server-ID, no
    correlation_id) or 'generic' (reply_to + correlation_id; the body has no Msg-ID)."""

    def __init__(self, name, style, body=None, props=None, outcomes=(ERROR,), timeout=None):
        self.name = name
        self.style = style
        self._body = body
        self._props = props or {}
        self.outcomes = outcomes
        self.timeout = timeout

    def reply(self, request, props):
        """(exchange, routing key, body, properties) of the reply to ``request``."""
        if self._body is None:
            body = {'Case': self.name}
            if self.style == 'kazoo':
                body['Msg-ID'] = request['Msg-ID']
            body = js(body)
        else:
            body = self._body(request['Msg-ID'].encode()) if callable(self._body) else self._body
        reply_props = {'content_type': 'application/json'}
        if self.style == 'generic':
            reply_props['correlation_id'] = props['correlation_id']
            exchange, key = '', props['reply_to']
        else:
            exchange, key = 'targeted', request['Server-ID']
        reply_props.update(self._props)
        return exchange, key, body, reply_props


def _with_id(rest):
    return lambda msg_id: b'{"Msg-ID":"' + msg_id + b'",' + rest


# Acceptable outcomes: the reply returned (where its body is fine) or a KazooError;
# QueryTimeout only where nothing identifies the reply (said so at the case). A reply
# whose body cannot be read but whose correlation_id is fine must fail its query at
# once; so must one with a bad headers table: the table's length prefix lets a
# decoder step over it to the correlation_id that follows it on the wire.
REPLY_CASES = [
    ReplyCase('deep-array-generic', 'generic', b'[' * 100000),
    # Nothing identifies a kazoo-style reply whose body cannot be read (no
    # correlation_id): the query may time out.
    ReplyCase('deep-object-kazoo', 'kazoo',
              _with_id(b'"a":' + b'{"a":' * 5000 + b'1' + b'}' * 5001),
              outcomes=(ERROR, TIMEOUT)),
    ReplyCase('deep-object-generic', 'generic', b'{"a":' * 5000 + b'1' + b'}' * 5000),
    ReplyCase('deep-closed-array-generic', 'generic',
              b'{"Case":"deep-closed-array-generic","D":' + b'[' * 100000 + b']' * 100000
              + b'}',
              outcomes=(ERROR, OK)),
    ReplyCase('invalid-utf8-body-generic', 'generic', b'{"Case":"' + INVALID + b'"}'),
    ReplyCase('json-array-generic', 'generic', b'[1,2,3]'),
    ReplyCase('json-null-generic', 'generic', b'null'),
    ReplyCase('empty-body-generic', 'generic', b''),
    ReplyCase('5000-digit-int-generic', 'generic', b'{"N":' + b'9' * 5000 + b'}'),
    ReplyCase('content-type-invalid-utf8-generic', 'generic',
              props={'content_type': INVALID}, outcomes=(OK, ERROR)),
    ReplyCase('content-type-invalid-utf8-kazoo', 'kazoo',
              props={'content_type': INVALID}, outcomes=(OK, ERROR)),
    # The reply's only identification is a correlation_id that is not UTF-8: it cannot
    # match, so the query may time out.
    ReplyCase('correlation-id-invalid-utf8-generic', 'generic',
              props={'correlation_id': INVALID}, outcomes=(TIMEOUT, ERROR)),
    ReplyCase('correlation-id-invalid-utf8-kazoo', 'kazoo',
              props={'correlation_id': INVALID}, outcomes=(OK, ERROR)),
    ReplyCase('message-id-invalid-utf8-with-headers-generic', 'generic',
              props={'message_id': INVALID, 'app_id': INVALID, 'headers': {'X': 'y'}},
              outcomes=(OK, ERROR)),
    ReplyCase('header-key-invalid-utf8-generic', 'generic',
              props={'headers': {INVALID: 'v'}}, outcomes=(OK, ERROR)),
    ReplyCase('header-value-invalid-utf8-generic', 'generic',
              props={'headers': {'k': INVALID}}, outcomes=(OK, ERROR)),
    ReplyCase('header-deep-table-generic', 'generic',
              props={'headers': {'d': deep_table(5000)}}, outcomes=(OK, ERROR)),
    ReplyCase('header-timestamp-max-generic', 'generic',
              props={'headers': {'t': Field(b'T' + pack('>Q', 2 ** 64 - 1))}},
              outcomes=(OK, ERROR)),
    # Body and every property unusable: nothing identifies it.
    ReplyCase('everything-invalid-kazoo', 'kazoo', b'{"Msg-ID":"' + INVALID + b'"',
              props={name: INVALID for name, bit, kind in PROPERTIES
                     if kind == 's' and name not in ('user_id', 'expiration')},
              outcomes=(TIMEOUT, ERROR)),
    ReplyCase('huge-8MB-generic', 'generic', js({'Case': 'huge-8MB-generic',
                                                 'Pad': 'p' * (8 * 1024 * 1024)}),
              outcomes=(OK,), timeout=10.0),
]
GOOD_REPLY = ReplyCase('good', 'kazoo')
_REPLIES = dict((c.name, c) for c in REPLY_CASES + [GOOD_REPLY])
assert len(_REPLIES) == len(REPLY_CASES) + 1


def responder_main(exchange):
    """Answer every request on ``exchange``/poison.req with the reply its Case names."""
    conn = _connect()
    channel = conn.channel()
    channel.exchange_declare(exchange, 'topic', auto_delete=False)
    queue = channel.queue_declare('', exclusive=True).queue
    channel.queue_bind(queue, exchange, 'poison.req')

    def on_request(message):
        request = simplejson.loads(message.body)
        case = _REPLIES[request['Case']]
        reply_exchange, key, body, props = case.reply(request, message.properties)
        conn.transport.write(publish_frames(channel.channel_id, reply_exchange, key, body,
                                            props, conn.frame_max))

    channel.basic_consume(queue, no_ack=True, callback=on_request)
    print('ready', flush=True)
    while True:
        try:
            conn.drain_events(timeout=1)
        except socket.timeout:
            pass


@pytest.fixture(scope='module')
def hostile_responder(admin):
    """(exchange, process) of the responder process."""
    exchange = unique('poison-callmgr')
    proc = subprocess.Popen([sys.executable, '-m', 'tests.integration.test_poison',
                             'responder', exchange], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == 'ready', 'the responder did not start'
        yield exchange, proc
    finally:
        proc.kill()
        proc.wait()
        admin.delete(exchanges=[exchange])


def ask(kz, exchange, case, timeout=None):
    """Query the responder for ``case``'s reply (within ``timeout``, default the runtime's
    query_timeout of 1 s; the good queries around a case get 5 s: they are not timed)."""
    if timeout is None and case == 'good':
        timeout = 5.0
    return kz.query(exchange, 'poison.req', {'Event-Category': 'poison', 'Event-Name': 'req',
                                             'Case': case}, timeout=timeout)


@pytest.mark.parametrize('fast', FRAME_PATHS)
@pytest.mark.parametrize('case', REPLY_CASES, ids=[c.name for c in REPLY_CASES])
@pytest.mark.parametrize('started', [False, True], ids=['caller-driven', 'started'])
def test_hostile_reply(case, started, fast, hostile_responder, runtimes):
    reply_exchange, proc = hostile_responder
    assert proc.poll() is None, 'the responder died (exit %s) in an earlier case' % proc.poll()
    kz = runtimes(RABBIT_URL, blocking=not started, query_timeout=1.0, poll_interval=0.02,
                  fast=fast)
    if started:
        kz.start()
        assert kz.wait_connected(5)
    assert ask(kz, reply_exchange, 'good')['Case'] == 'good'   # connected, responder up
    base = kz.stats()
    try:
        reply = ask(kz, reply_exchange, case.name, timeout=case.timeout)
        outcome, detail = OK, 'returned %.200r' % (reply,)
    except QueryTimeout as exc:
        outcome, detail = TIMEOUT, 'raised QueryTimeout: %s' % exc
    except KazooError as exc:
        outcome, detail = ERROR, 'raised %s: %s' % (type(exc).__name__, exc)
    except Exception as exc:
        pytest.fail('%s: the query raised %s (not a KazooError): %s'
                    % (case.name, type(exc).__name__, str(exc)[:300]))
    stats = kz.stats()
    assert outcome in case.outcomes, '%s: the query %s; expected: %s%s' % (
        case.name, detail, ' or '.join(case.outcomes),
        ' (no timeout: the reply is identifiable, by its correlation_id or its body\'s '
        'Msg-ID, which are intact)' if outcome == TIMEOUT else '')
    if outcome == OK:
        assert reply.get('Case') == case.name, '%s: not its reply: %.200r' % (case.name, reply)
    lost = {k: stats[k] - base[k] for k in ('connects', 'reconnects', 'connection_errors')}
    assert not any(lost.values()), '%s: the query %s, and the connection was lost (%s)' % (
        case.name, detail, ', '.join('%s=%+d' % kv for kv in lost.items() if kv[1]))
    try:
        after = ask(kz, reply_exchange, 'good')
    except Exception as exc:
        pytest.fail('%s: the query %s; the next query then raised %s: %s'
                    % (case.name, detail, type(exc).__name__, str(exc)[:300]))
    assert after.get('Case') == 'good', '%s: the next query got %.200r' % (case.name, after)
    stats = kz.stats()
    assert stats['pending_queries'] == 0 and stats['connects'] == base['connects'], stats
    assert proc.poll() is None, '%s: the responder died (its reply refused?)' % case.name


if __name__ == '__main__' and sys.argv[1:2] == ['responder']:
    responder_main(sys.argv[2])
