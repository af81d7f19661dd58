"""Consumed messages: basic.deliver and its content frames, assembled and handed over.

py-amqp lets a Connection take its own ``frame_handler`` (a public argument of
``amqp.Connection``, which kombu passes through ``transport_options``). kazoo_green's
handler assembles basic.deliver + content header + body frames itself and hands every
other frame to py-amqp's own handler. So on every RabbitMQ connection, with or without
FastPath, deliveries are parsed here, and whatever a message holds (properties or a
headers table that cannot be decoded, an exchange or routing key that is not UTF-8)
reaches its consumer as a ``Delivered`` whose ``bad`` says what is wrong, instead of an
exception in the middle of the frame stream that would take the connection down (and
bring the unacked message back, again and again).

Consumers are found in a ``Consumers`` table (``(channel id, consumer tag) ->
callback``) that the Link fills as it consumes, not in py-amqp's channel internals.
"""

from struct import Struct

from amqp.exceptions import UnexpectedFrame
from amqp.method_framing import frame_handler as pyamqp_frame_handler
from amqp.serialization import loads as _loads

__all__ = ['Delivered', 'FrameHandler', 'Consumers', 'decode_properties', 'delivery_info',
           'DELIVER_SIG']

DELIVER_SIG = b'\x00\x3c\x00\x3c'   # class 60 (basic), method 60 (deliver)
_DELIVER_TAG = Struct('>QB')
_Q = Struct('>Q')
_H = Struct('>H')
_I = Struct('>I')

# Basic properties in wire order: (name, flag bit, kind); 'F' is the headers table.
PROPERTIES = (
    ('content_type', 0x8000, 's'), ('content_encoding', 0x4000, 's'),
    ('application_headers', 0x2000, 'F'), ('delivery_mode', 0x1000, 'B'),
    ('priority', 0x0800, 'B'), ('correlation_id', 0x0400, 's'), ('reply_to', 0x0200, 's'),
    ('expiration', 0x0100, 's'), ('message_id', 0x0080, 's'), ('timestamp', 0x0040, 'Q'),
    ('type', 0x0020, 's'), ('user_id', 0x0010, 's'), ('app_id', 0x0008, 's'),
    ('cluster_id', 0x0004, 's'))
_LAYOUTS = {}        # flags -> ((name, kind), ...) present, in wire order


def layout(flags):
    """The properties ``flags`` says are present, as ((name, kind), ...) in wire order."""
    found = _LAYOUTS.get(flags)
    if found is None:
        found = _LAYOUTS[flags] = tuple((name, kind) for name, bit, kind in PROPERTIES
                                        if flags & bit)
    return found


def decode_properties(buf, offset, end):
    """Basic properties in ``buf[offset:end]`` (from the flags on) as ``(properties,
    bad)``: what py-amqp's decode_properties_basic gives, and None, or why some could not
    be decoded (text that is not UTF-8, a headers table nested too deep or with a value
    Python cannot hold, a truncated frame, ...). What can be decoded still is: a reply
    whose content_type is broken still names the query it answers."""
    properties = {}
    bad = None
    try:
        flags = _H.unpack_from(buf, offset)[0]
        if flags & 0x0001:
            raise ValueError('property flags continue: not AMQP 0-9-1 basic')
        offset += 2
        for name, kind in layout(flags):
            if kind == 's':
                stop = offset + 1 + buf[offset]
                if stop > end:
                    raise ValueError('truncated')
                try:
                    properties[name] = bytes(buf[offset + 1:stop]).decode('utf-8')
                except UnicodeDecodeError:
                    bad = bad or '%s is not UTF-8' % name
                offset = stop
            elif kind == 'B':
                properties[name] = buf[offset]
                offset += 1
            elif kind == 'F':
                stop = offset + 4 + _I.unpack_from(buf, offset)[0]
                if stop > end:
                    raise ValueError('truncated')
                try:
                    properties[name] = _loads('F', bytes(buf[offset:stop]), 0)[0][0]
                except Exception as exc:   # skipped: its length is known
                    bad = bad or 'headers cannot be decoded (%s: %s)' % (
                        type(exc).__name__, _short(str(exc)))
                offset = stop
            else:
                properties[name] = _Q.unpack_from(buf, offset)[0]
                offset += 8
        if offset > end:
            raise ValueError('truncated')
    except Exception as exc:   # whatever the bytes are: this message is bad, not the link
        bad = 'properties cannot be decoded (%s: %s)' % (type(exc).__name__, _short(str(exc)))
    return properties, bad


def _short(text, limit=120):
    return text if len(text) <= limit else text[:limit] + '...'


def _text(data, what, bad):
    try:
        return data.decode('utf-8'), bad
    except UnicodeDecodeError:
        return data.decode('utf-8', 'backslashreplace'), bad or '%s is not UTF-8' % what


def delivery_info(method):
    """basic.deliver's arguments (``method`` is its payload) as ``(delivery_info, bad)``:
    the dict py-amqp gives, and None or why the message is bad (an exchange or routing
    key that is not UTF-8 is given with its bad bytes as backslash escapes)."""
    offset = 4
    n = method[offset]
    consumer_tag = bytes(method[offset + 1:offset + 1 + n]).decode('utf-8', 'replace')
    offset += 1 + n
    delivery_tag, redelivered = _DELIVER_TAG.unpack_from(method, offset)
    offset += 9
    n = method[offset]
    exchange, bad = _text(bytes(method[offset + 1:offset + 1 + n]), 'exchange', None)
    offset += 1 + n
    n = method[offset]
    routing_key, bad = _text(bytes(method[offset + 1:offset + 1 + n]), 'routing key', bad)
    return {'consumer_tag': consumer_tag, 'delivery_tag': delivery_tag,
            'redelivered': bool(redelivered), 'exchange': exchange,
            'routing_key': routing_key}, bad


class Delivered(object):
    """A consumed message, with the attributes kazoo_green's callbacks read.

    ``bad`` is None, or why the message cannot be used (its properties could not be
    decoded, say): the consumer rejects it. ``delivery_info`` is decoded from the
    basic.deliver arguments (``method``) when first read, which may set ``bad`` too;
    replies to queries never need it.
    """

    __slots__ = ('body', 'properties', '_info', '_method', 'channel', 'bad')

    def __init__(self, body, properties, channel, method, bad=None):
        self.body = body
        self.properties = properties
        self._info = None
        self._method = method
        self.channel = channel
        self.bad = bad

    @property
    def delivery_info(self):
        info = self._info
        if info is None:
            info, bad = delivery_info(self._method)
            self._info = info
            if bad and not self.bad:
                self.bad = bad
        return info

    @property
    def delivery_tag(self):
        return _DELIVER_TAG.unpack_from(self._method, 5 + self._method[4])[0]

    @property
    def headers(self):
        return self.properties.get('application_headers')


class Consumers(dict):
    """``(channel id, consumer tag) -> callback`` of one connection's consumers."""


class _Pending(object):
    """A delivery whose content frames are still arriving."""

    __slots__ = ('method', 'properties', 'bad', 'size', 'chunks', 'got')

    def __init__(self, method):
        self.method = method
        self.properties = None
        self.bad = None
        self.size = -1
        self.chunks = []
        self.got = 0


class FrameHandler(object):
    """py-amqp's ``frame_handler`` for one connection: ``FrameHandler.factory(consumers)``
    is what ``amqp.Connection(frame_handler=...)`` takes.

    Called with every frame ``(type, channel, payload)``; returns, as py-amqp's own
    handler, whether a whole method (or message) was handled.
    """

    __slots__ = ('connection', 'consumers', 'default', 'pending')

    def __init__(self, connection, callback, consumers):
        self.connection = connection
        self.consumers = consumers
        self.default = pyamqp_frame_handler(connection, callback)
        #: channel id -> _Pending, for deliveries whose frames are still arriving
        self.pending = {}

    @classmethod
    def factory(cls, consumers):
        def make(connection, callback):
            return cls(connection, callback, consumers)
        return make

    def __call__(self, frame):
        frame_type, channel, payload = frame
        pending = self.pending.get(channel)
        if pending is None:
            if frame_type == 1 and payload[:4] == DELIVER_SIG:
                self.connection.bytes_recv += 1
                self.pending[channel] = _Pending(payload)
                return False
            return self.default(frame)
        self.connection.bytes_recv += 1
        if frame_type == 2 and pending.size < 0:
            if len(payload) < 14:
                raise UnexpectedFrame('content header of %d bytes' % len(payload))
            pending.size = _Q.unpack_from(payload, 4)[0]
            pending.properties, pending.bad = decode_properties(payload, 12, len(payload))
            if pending.size:
                return False
            body = b''
        elif frame_type == 3 and pending.size >= 0:
            pending.chunks.append(payload)
            pending.got += len(payload)
            if pending.got < pending.size:
                return False
            chunks = pending.chunks
            body = chunks[0] if len(chunks) == 1 else b''.join(chunks)
        elif frame_type == 8:
            return False
        else:
            raise UnexpectedFrame('Received frame %d while expecting content on channel %d'
                                  % (frame_type, channel))
        del self.pending[channel]
        self.deliver(channel, pending.method, pending.properties, body, pending.bad)
        return True

    def deliver(self, channel_id, method, properties, body, bad=None):
        """Hand a complete message to its consumer's callback; ``method`` is the
        basic.deliver payload (only the consumer tag is decoded here)."""
        n = method[4]
        callback = self.consumers.get((channel_id, method[5:5 + n].decode('utf-8',
                                                                          'replace')))
        if callback is None:
            # As py-amqp does: nobody consumes with that tag (any more): give it back.
            channel = self.connection.channels.get(channel_id)
            if channel is not None:
                channel.basic_reject(_DELIVER_TAG.unpack_from(method, 5 + n)[0],
                                     requeue=True)
            return
        callback(Delivered(body, properties, self.connection.channels.get(channel_id),
                           method, bad))
