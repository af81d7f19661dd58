"""A lean path for the hot AMQP 0-9-1 frames, beside py-amqp on the same connection.

py-amqp reads a frame with three exact-size ``recv`` calls and builds several objects
per frame; a query costs about ten ``recv`` calls and two passes through its generic
method machinery each way. On a connection already opened by py-amqp, ``FastPath``:

* reads the socket in large chunks into one buffer that py-amqp also reads from (its
  ``transport.read_frame`` is served from the buffer), so both always agree on the
  stream;
* parses ``basic.deliver`` + content itself and calls the consumer's callback with a
  small ``Delivered`` object (``body``, ``properties``, ``delivery_info``, ``headers``,
  ``delivery_tag``); every other frame goes to py-amqp's own frame handler unchanged
  (channel/connection close, confirms, returns, heartbeats, RPC answers);
* writes ``basic.publish`` (method, header and body frames in one ``write``) and
  ``basic.ack`` / ``basic.reject`` from precomputed layouts.

It is used only for RabbitMQ (pyamqp) connections. ``blocking=True`` waits with the
real ``poll(2)`` instead of gevent's hub, for reads and writes (py-amqp's writes too):
for Kamailio SIP workers, where nothing else may run anyway and a hub switch per read
is pure cost. A blocking FastPath never lets another greenlet run.
"""

import calendar
import math
import socket
from struct import Struct, pack, unpack_from
from time import monotonic

from amqp.exceptions import UnexpectedFrame
from amqp.serialization import decode_properties_basic, dumps as amqp_dumps
from gevent import monkey
from gevent.socket import wait_write, wait_read

__all__ = ['FastPath', 'Delivered', 'encode_publish', 'encode_request', 'FAST_PROPERTIES']

_poll = monkey.get_original('select', 'poll')
_POLLIN = 0x001
_POLLOUT = 0x004

_FRAME_HEADER = Struct('>BHI')
_HEADER_START = Struct('>HHQH')
# A content header frame's start: frame type, channel, size; class, weight, body size
# (then the property flags).
_CONTENT_HEADER = Struct('>BHIHHQ')
_REQUEST_HEADER = Struct('>BHIHHQH')   # ... and the property flags
_BODY_START = Struct('>BBHI')          # a frame end, then a body frame's type, channel, size
_DELIVER_TAG = Struct('>QB')
_ACK = Struct('>BHIHHQBB')       # frame header, class, method, tag, bit, frame end
_FRAME_END = b'\xce'
_PUBLISH_SIG = pack('>HHH', 60, 40, 0)
# exchange.declare(reserved, 'amq.direct', 'direct', passive, no other bits, {})
_PROBE_DECLARE = pack('>HHH', 40, 10, 0) + b'\x0aamq.direct\x06direct\x01' + b'\x00' * 4
_DELIVER_SIG = pack('>HH', 60, 60)
_CHUNK = 65536

#: Properties the fast writer encodes (all of AMQP 0-9-1 basic's but the headers
#: table, which is its own argument); any other goes through py-amqp.
FAST_PROPERTIES = frozenset(['content_type', 'content_encoding', 'delivery_mode', 'priority',
                             'correlation_id', 'reply_to', 'expiration', 'message_id',
                             'timestamp', 'type', 'user_id', 'app_id', 'cluster_id'])
# Basic properties in wire order: (name, flag bit, kind); 'F' is the headers table.
_PROPERTIES = (
    ('content_type', 0x8000, 's'), ('content_encoding', 0x4000, 's'),
    ('application_headers', 0x2000, 'F'), ('delivery_mode', 0x1000, 'B'),
    ('priority', 0x0800, 'B'), ('correlation_id', 0x0400, 's'), ('reply_to', 0x0200, 's'),
    ('expiration', 0x0100, 's'), ('message_id', 0x0080, 's'), ('timestamp', 0x0040, 'Q'),
    ('type', 0x0020, 's'), ('user_id', 0x0010, 's'), ('app_id', 0x0008, 's'),
    ('cluster_id', 0x0004, 's'))
_FLAG = dict((name, bit) for name, bit, kind in _PROPERTIES if kind != 'F')
_LAYOUTS = {}        # flags -> ((name, kind), ...) present, in wire order
_METHODS = {}        # (channel, exchange, routing key, mandatory) -> basic.publish frame
_METHODS_MAX = 4096  # routing keys can be many (one per user): a bounded cache
_Q = Struct('>Q')
_H = Struct('>H')
_BYTE = tuple(bytes((n,)) for n in range(256))


def _layout(flags):
    layout = _LAYOUTS.get(flags)
    if layout is None:
        layout = _LAYOUTS[flags] = tuple((name, kind) for name, bit, kind in _PROPERTIES
                                         if flags & bit)
    return layout


def _shortstr(value):
    data = value.encode('utf-8') if isinstance(value, str) else bytes(value)
    if len(data) > 255:
        raise ValueError('AMQP short string longer than 255 bytes: %r...' % data[:40])
    return _BYTE[len(data)] + data


def _frame(frame_type, channel_id, payload):
    return b''.join((_FRAME_HEADER.pack(frame_type, channel_id, len(payload)), payload,
                     _FRAME_END))


def _timestamp(value):
    if hasattr(value, 'utctimetuple'):  # a datetime, as py-amqp accepts (and encodes)
        return calendar.timegm(value.utctimetuple())
    return int(value)


def _publish_method(channel_id, exchange, routing_key, mandatory):
    key = (channel_id, exchange, routing_key, mandatory)
    frame = _METHODS.get(key)
    if frame is None:
        if len(_METHODS) >= _METHODS_MAX:
            _METHODS.clear()
        frame = _METHODS[key] = _frame(1, channel_id, b''.join((
            _PUBLISH_SIG, _shortstr(exchange), _shortstr(routing_key),
            b'\x01' if mandatory else b'\x00')))
    return frame


def encode_publish(channel_id, exchange, routing_key, body, properties, headers,
                   mandatory, frame_max):
    """The frames of one ``basic.publish`` (method, content header, body) as bytes.

    ``properties`` may hold any of ``FAST_PROPERTIES`` (others are ignored);
    ``headers`` is the headers table.
    """
    flags = 0x2000 if headers else 0
    for name, value in properties.items():
        if value is not None:
            flags |= _FLAG.get(name, 0)
    parts = [_HEADER_START.pack(60, 0, len(body), flags)]
    for name, kind in _layout(flags):
        if kind == 's':
            parts.append(_shortstr(properties[name]))
        elif kind == 'B':
            parts.append(bytes((properties[name],)))
        elif kind == 'F':
            parts.append(amqp_dumps('F', [headers]))
        else:
            parts.append(_Q.pack(_timestamp(properties[name])))
    header = b''.join(parts)
    out = [_publish_method(channel_id, exchange, routing_key, bool(mandatory)),
           _FRAME_HEADER.pack(2, channel_id, len(header)), header, _FRAME_END]
    chunk = frame_max - 8
    if not body:
        pass  # no body frame at all, as py-amqp
    elif len(body) <= chunk:
        out += (_FRAME_HEADER.pack(3, channel_id, len(body)), body, _FRAME_END)
    else:
        for start in range(0, len(body), chunk):
            piece = body[start:start + chunk]
            out += (_FRAME_HEADER.pack(3, channel_id, len(piece)), piece, _FRAME_END)
    return b''.join(out)


_JSON_UTF8 = b'\x10application/json\x05utf-8'   # content_type, content_encoding
_REQUEST_FLAGS = 0x8000 | 0x4000 | 0x0400             # ... and correlation_id


def encode_request(channel_id, exchange, routing_key, body, correlation_id, reply_to,
                   headers, mandatory, frame_max):
    """``encode_publish`` of a query's request: ``body`` (JSON) with properties
    content_type ``application/json``, content_encoding ``utf-8``, ``correlation_id``
    and ``reply_to`` (unless None); the same bytes in far fewer steps when there are no
    ``headers`` (a SIP worker sends one per call, with cold caches)."""
    corr = correlation_id.encode('utf-8')
    flags = _REQUEST_FLAGS
    props = _JSON_UTF8 + _BYTE[len(corr)] + corr if len(corr) < 256 else None
    if reply_to is not None:
        flags |= 0x0200
        reply = reply_to.encode('utf-8')
        props = props + _BYTE[len(reply)] + reply if props and len(reply) < 256 else None
    if props is None or headers or not body or len(body) > frame_max - 8:
        properties = {'content_type': 'application/json', 'content_encoding': 'utf-8',
                      'correlation_id': correlation_id, 'reply_to': reply_to}
        return encode_publish(channel_id, exchange, routing_key, body, properties, headers,
                              mandatory, frame_max)
    return b''.join((_publish_method(channel_id, exchange, routing_key, bool(mandatory)),
                     _REQUEST_HEADER.pack(2, channel_id, 14 + len(props), 60, 0, len(body),
                                          flags),
                     props, _BODY_START.pack(0xce, 3, channel_id, len(body)), body,
                     _FRAME_END))


def decode_properties(buf, offset, end):
    """Basic properties in ``buf[offset:end]`` (from the flags on) as py-amqp's
    decode_properties_basic gives them; a headers table (or flag continuation) is left
    to py-amqp."""
    flags = _H.unpack_from(buf, offset)[0]
    if flags & 0x2001:
        return decode_properties_basic(bytes(buf[offset:end]), 0)[0]
    offset += 2
    properties = {}
    for name, kind in _layout(flags):
        if kind == 's':
            end = offset + 1 + buf[offset]
            properties[name] = bytes(buf[offset + 1:end]).decode('utf-8', 'surrogatepass')
            offset = end
        elif kind == 'B':
            properties[name] = buf[offset]
            offset += 1
        else:
            properties[name] = _Q.unpack_from(buf, offset)[0]
            offset += 8
    return properties


class Delivered(object):
    """A consumed message, with the attributes kazoo_green's callbacks read.

    ``delivery_info`` is decoded from the basic.deliver arguments (``method``) when
    first read: replies to queries never need it.
    """

    __slots__ = ('body', 'properties', '_info', '_method', 'channel')

    def __init__(self, body, properties, delivery_info, channel, method=None):
        self.body = body
        self.properties = properties
        self._info = delivery_info
        self._method = method
        self.channel = channel

    @property
    def delivery_info(self):
        info = self._info
        if info is None:
            info = self._info = FastPath._delivery_info(self._method, 0)
        return info

    @property
    def delivery_tag(self):
        return self.delivery_info['delivery_tag']

    @property
    def headers(self):
        return self.properties.get('application_headers')


class _Pending(object):
    """A delivery whose content frames are still arriving."""

    __slots__ = ('method', 'properties', 'size', 'chunks', 'got')


class FastPath(object):
    """Buffered reads and the hot frames for one open py-amqp connection."""

    def __init__(self, connection, blocking=False):
        self.connection = connection
        transport = connection.transport
        self.transport = transport
        self.sock = transport.sock
        self.frame_max = connection.frame_max
        self.blocking = blocking
        # Whatever py-amqp had read ahead (nothing normally: it reads exact sizes).
        self._buf = bytearray(transport._read_buffer or b'')
        self._pos = 0
        transport._read_buffer = b''
        transport.read_frame = self._read_frame
        self._inbound = connection.on_inbound_frame
        self._pending = {}
        self._poller = _poll()
        self._poller.register(self.sock.fileno(), _POLLIN)
        self._fileno = self.sock.fileno()
        raw = getattr(self.sock, '_sock', self.sock)  # gevent wraps the real socket
        self._raw_recv = raw.recv
        self._raw_send = raw.send
        self._out_poller = None
        if blocking:
            transport._write = self._write   # py-amqp's frames wait in poll(2) too
        #: Seconds a write may wait for the socket to drain (None: no limit).
        self.write_timeout = None

    # -- reading --------------------------------------------------------
    def _fill(self, timeout):
        """Append what the socket has (waiting up to ``timeout``); socket.timeout if none.

        The socket's own timeout is never changed: writers on other greenlets share it.
        """
        while True:
            if self.blocking:
                ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
                if not self._poller.poll(ms):
                    raise socket.timeout()
            else:
                wait_read(self._fileno, timeout)
            try:
                data = self._raw_recv(_CHUNK)
                break
            except (BlockingIOError, InterruptedError):
                if timeout is not None and timeout <= 0:
                    raise socket.timeout()
        if not data:
            self.transport.connected = False
            raise OSError('Server unexpectedly closed connection')
        buf = self._buf
        pos = self._pos
        if pos and (pos == len(buf) or (pos > _CHUNK and pos * 2 > len(buf))):
            del buf[:pos]   # all read (the usual case), or much: start over
            self._pos = 0
        buf += data

    def _frame_at(self, pos):
        """(type, channel, end) of the frame at ``pos`` if the buffer holds all of it
        (its payload is ``buf[pos + 7:end]``), else None."""
        buf = self._buf
        if len(buf) - pos < 8:
            return None
        frame_type, channel, size = _FRAME_HEADER.unpack_from(buf, pos)
        end = pos + 7 + size
        if len(buf) <= end:
            return None
        if buf[end] != 0xce:
            raise UnexpectedFrame('Received frame_end %r while expecting 0xce' % (buf[end],))
        return frame_type, channel, end

    def _next_frame(self):
        """The next complete frame in the buffer as (type, channel, payload), or None."""
        pos = self._pos
        found = self._frame_at(pos)
        if found is None:
            return None
        frame_type, channel, end = found
        self._pos = end + 1
        return frame_type, channel, bytes(self._buf[pos + 7:end])

    def _read_frame(self, unpack=None):
        """py-amqp's ``transport.read_frame``, served from the shared buffer.

        A timeout consumes nothing, so a frame is never split between readers.
        """
        frame = self._next_frame()
        while frame is None:
            self._fill(self.sock.gettimeout())
            frame = self._next_frame()
        return frame

    def has_pending(self):
        """Whether a read now would return at once (data buffered or on the socket)."""
        return len(self._buf) - self._pos >= 8 or bool(self._poller.poll(0))

    def ask(self, data, deadline, done, tags):
        """For a caller no other greenlet can interrupt (a blocking FastPath never lets
        one run): write ``data`` (whole frames, unless None), then read until a message
        for one of the consumer ``tags`` (bytes) is in, and return it undispatched as
        ``(method, header, body)`` (the basic.deliver and content header payloads, the
        body). Everything else is handled as :meth:`drain` does; returns None when
        ``done()`` is true after that. socket.timeout at ``deadline``; a write that
        times out raises ConnectionError (the frames may be cut).

        This is Kamailio's sync query: one flat pass, because every Python function a
        SIP worker touches between two calls costs it several µs of cache misses.
        """
        if data is not None:
            try:
                self._write(data)
            except socket.timeout as exc:
                raise ConnectionError('write to the broker timed out: %s' % exc) from None
            self.connection.bytes_sent += 1
        buf = self._buf
        while True:
            pos = self._pos
            if len(buf) - pos >= 8:
                whole = None if self._pending else self._whole_at(pos)
                if whole is not None and buf.startswith(tags, pos + 11):
                    channel, end, header_end, body_at, stop = whole
                    self._pos = stop
                    self.connection.bytes_recv += 1
                    return (bytes(buf[pos + 7:end]), bytes(buf[end + 8:header_end]),
                            bytes(buf[body_at:stop - 1]))
                if self._frames(1):   # one at a time: what follows may be awaited
                    if done():
                        return None
                    continue
            self._fill(deadline - monotonic())

    def drain(self, timeout):
        """Handle every complete frame, reading (up to ``timeout``) until there was one.

        Raises socket.timeout when nothing arrived in time.
        """
        deadline = None if timeout is None else monotonic() + timeout
        while not self._frames():
            self._fill(None if deadline is None else max(0.0, deadline - monotonic()))

    def _frames(self, limit=-1):
        """Handle the complete frames in the buffer (at most ``limit`` frames or whole
        messages, if given); return how many there were."""
        handled = 0
        buf = self._buf
        while handled != limit:
            pos = self._pos
            whole = None if self._pending else self._whole_at(pos)
            if whole is not None:
                channel, end, header_end, body_at, stop = whole
                self._pos = stop
                self.connection.bytes_recv += 1
                self._deliver(channel, bytes(buf[pos + 7:end]),
                              decode_properties(buf, end + 20, header_end),
                              bytes(buf[body_at:stop - 1]))
                handled += 1
                continue
            found = self._frame_at(pos)
            if found is None:
                return handled
            frame_type, channel, end = found
            self._pos = end + 1
            self._frame(frame_type, channel, bytes(buf[pos + 7:end]))
            handled += 1
        return handled

    def _whole_at(self, pos):
        """Where the parts of a message are if the frame at ``pos`` is a basic.deliver and
        its content header and single body frame are in the buffer too (the usual case):
        ``(channel, end, header_end, body_at, stop)``: the method's payload is
        ``buf[pos + 7:end]``, the header's ``buf[end + 8:header_end]``, the body
        ``buf[body_at:stop - 1]``, and the last frame ends before ``stop``. Else None (and
        if anything looks wrong, the frame by frame path reports it)."""
        buf = self._buf
        size = len(buf)
        if size - pos < 8:
            return None
        frame_type, channel, length = _FRAME_HEADER.unpack_from(buf, pos)
        end = pos + 7 + length
        header = end + 1
        if (frame_type != 1 or size - header < 22 or buf[end] != 0xce
                or buf[pos + 7:pos + 11] != _DELIVER_SIG):
            return None
        frame_type, frame_channel, length, _, _, body_size = \
            _CONTENT_HEADER.unpack_from(buf, header)
        header_end = header + 7 + length
        if (frame_type != 2 or frame_channel != channel or size <= header_end
                or buf[header_end] != 0xce):
            return None
        if not body_size:
            return channel, end, header_end, header_end + 1, header_end + 1
        body_at = header_end + 1
        if size - body_at < 8:
            return None
        frame_type, frame_channel, length = _FRAME_HEADER.unpack_from(buf, body_at)
        body_end = body_at + 7 + length
        if (frame_type != 3 or frame_channel != channel or length != body_size
                or size <= body_end or buf[body_end] != 0xce):
            return None
        return channel, end, header_end, body_at + 7, body_end + 1

    def _frame(self, frame_type, channel, payload):
        pending = self._pending.get(channel)
        if pending is None:
            if frame_type == 1 and payload[:4] == _DELIVER_SIG:
                self._deliver_method(channel, payload)
                self.connection.bytes_recv += 1
                return
            self._inbound((frame_type, channel, payload))
            return
        self.connection.bytes_recv += 1
        if frame_type == 2:
            pending.properties = decode_properties(payload, 12, len(payload))
            pending.size = unpack_from('>Q', payload, 4)[0]
            if pending.size == 0:
                self._complete(channel, pending, b'')
        elif frame_type == 3:
            pending.chunks.append(payload)
            pending.got += len(payload)
            if pending.got >= pending.size:
                body = pending.chunks[0] if len(pending.chunks) == 1 else \
                    b''.join(pending.chunks)
                self._complete(channel, pending, body)
        elif frame_type == 8:
            pass
        else:
            raise UnexpectedFrame('Received frame %d while expecting content on channel %d'
                                  % (frame_type, channel))

    @staticmethod
    def _delivery_info(buf, offset):
        """basic.deliver's arguments (``buf[offset:]`` is its method payload) as the
        ``delivery_info`` dict py-amqp gives."""
        offset += 4
        n = buf[offset]
        consumer_tag = bytes(buf[offset + 1:offset + 1 + n]).decode('utf-8')
        offset += 1 + n
        delivery_tag, redelivered = _DELIVER_TAG.unpack_from(buf, offset)
        offset += 9
        n = buf[offset]
        exchange = bytes(buf[offset + 1:offset + 1 + n]).decode('utf-8')
        offset += 1 + n
        n = buf[offset]
        routing_key = bytes(buf[offset + 1:offset + 1 + n]).decode('utf-8')
        return {'consumer_tag': consumer_tag, 'delivery_tag': delivery_tag,
                'redelivered': bool(redelivered), 'exchange': exchange,
                'routing_key': routing_key}

    def _deliver_method(self, channel, payload):
        pending = _Pending()
        pending.method = payload
        pending.properties = None
        pending.size = -1
        pending.chunks = []
        pending.got = 0
        self._pending[channel] = pending

    def _complete(self, channel_id, pending, body):
        del self._pending[channel_id]
        self._deliver(channel_id, pending.method, pending.properties, body)

    def _deliver(self, channel_id, method, properties, body):
        """Hand a complete message to its consumer's callback; ``method`` is the
        basic.deliver payload (only the consumer tag is decoded here)."""
        channel = self.connection.channels.get(channel_id)
        if channel is None:
            return
        n = method[4]
        callback = channel.callbacks.get(method[5:5 + n].decode('utf-8'))
        if callback is None:
            # As py-amqp does: nobody consumes with that tag (any more): give it back.
            channel.basic_reject(self._delivery_info(method, 0)['delivery_tag'], requeue=True)
            return
        callback(Delivered(body, properties, None, channel, method))

    # -- writing --------------------------------------------------------
    def _write(self, data):
        """Send all of ``data``: straight to the socket, waiting only if it is full.

        Raises socket.timeout after ``write_timeout`` seconds without progress: the
        frame may be cut, so the caller must drop the connection.
        """
        send = self._raw_send
        try:
            sent = send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.transport.connected = False
            raise
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            self._wait_writable()
            try:
                sent = send(view)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                self.transport.connected = False
                raise
            view = view[sent:]

    def _wait_writable(self):
        timeout = self.write_timeout
        if not self.blocking:
            wait_write(self._fileno, timeout)
            return
        poller = self._out_poller
        if poller is None:
            poller = self._out_poller = _poll()
            poller.register(self._fileno, _POLLOUT)
        if not poller.poll(-1 if timeout is None else max(0, math.ceil(timeout * 1000))):
            raise socket.timeout('timed out')

    def send(self, frames):
        """Write whole frames (e.g. from ``encode_publish``)."""
        self._write(frames)
        self.connection.bytes_sent += 1

    def probe(self, channel_id):
        """A passive ``exchange.declare`` of amq.direct: a request every broker answers."""
        self._write(_frame(1, channel_id, _PROBE_DECLARE))
        self.connection.bytes_sent += 1

    def ack(self, channel_id, delivery_tag):
        self._write(_ACK.pack(1, channel_id, 13, 60, 80, delivery_tag, 0, 0xce))
        self.connection.bytes_sent += 1

    def reject(self, channel_id, delivery_tag, requeue=False):
        self._write(_ACK.pack(1, channel_id, 13, 60, 90, delivery_tag, 1 if requeue else 0,
                              0xce))
        self.connection.bytes_sent += 1
