"""A lean path for the hot AMQP 0-9-1 frames, beside py-amqp on the same connection.

py-amqp reads a frame with three exact-size ``recv`` calls and builds several objects
per frame; a query costs about ten ``recv`` calls and two passes through its generic
method machinery each way. On a connection already opened by py-amqp, ``FastPath``:

* reads the socket in large chunks into one buffer that py-amqp also reads from (its
  ``transport.read_frame`` is served from the buffer), so both always agree on the
  stream;
* parses ``basic.deliver`` + content itself when the whole message is in the buffer
  and hands it to the connection's ``FrameHandler`` (``_deliver``), which gives it to
  the consumer's callback; every other frame goes to that handler frame by frame
  (and from there to py-amqp's own: channel/connection close, confirms, returns,
  heartbeats, RPC answers);
* writes ``basic.publish`` (method, header and body frames in one ``write``) and
  ``basic.ack`` / ``basic.reject`` from precomputed layouts.

It speaks plain TCP through the socket's file descriptor (``os.read``/``os.write``; it
reads only what poll(2) or gevent's hub said is there, and gevent's sockets never block)
and TLS through the SSL socket's own ``recv``/``send``/``pending`` with a zero timeout
around each call (the waits are FastPath's, in poll(2) or gevent's hub). py-amqp's private parts it needs are reached
only through ``_pyamqp``; where they are missing FastPath refuses the connection
(``HookUnavailable``) and the Link goes on without it.

It is used only for RabbitMQ (pyamqp) connections. ``blocking=True`` waits with the
real ``poll(2)`` instead of gevent's hub, for reads and writes (py-amqp's writes too):
for Kamailio SIP workers, where nothing else may run anyway and a hub switch per read
is pure cost. A blocking FastPath never lets another greenlet run.
"""

import calendar
import math
import os
import socket
import ssl
from functools import partial
from struct import Struct, pack
from time import monotonic

from amqp.exceptions import UnexpectedFrame
from amqp.serialization import dumps as amqp_dumps
from gevent import monkey
from gevent.socket import wait_read, wait_write

from . import _pyamqp as hooks
from ._deliver import DELIVER_SIG, FrameHandler, decode_properties, layout

__all__ = ['FastPath', 'HookUnavailable', 'encode_publish', 'encode_request',
           'FAST_PROPERTIES']

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
_ACK = Struct('>BHIHHQBB')       # frame header, class, method, tag, bit, frame end
_FRAME_END = b'\xce'
_PUBLISH_SIG = pack('>HHH', 60, 40, 0)
# exchange.declare(reserved, 'amq.direct', 'direct', passive, no other bits, {})
_PROBE_DECLARE = pack('>HHH', 40, 10, 0) + b'\x0aamq.direct\x06direct\x01' + b'\x00' * 4
_CHUNK = 65536
_SSL_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)

#: Properties the fast writer encodes (all of AMQP 0-9-1 basic's but the headers
#: table, which is its own argument); any other goes through py-amqp.
FAST_PROPERTIES = frozenset(['content_type', 'content_encoding', 'delivery_mode', 'priority',
                             'correlation_id', 'reply_to', 'expiration', 'message_id',
                             'timestamp', 'type', 'user_id', 'app_id', 'cluster_id'])
_FLAG = dict((name, bit) for name, bit, kind in (
    ('content_type', 0x8000, 's'), ('content_encoding', 0x4000, 's'),
    ('delivery_mode', 0x1000, 'B'), ('priority', 0x0800, 'B'),
    ('correlation_id', 0x0400, 's'), ('reply_to', 0x0200, 's'),
    ('expiration', 0x0100, 's'), ('message_id', 0x0080, 's'), ('timestamp', 0x0040, 'Q'),
    ('type', 0x0020, 's'), ('user_id', 0x0010, 's'), ('app_id', 0x0008, 's'),
    ('cluster_id', 0x0004, 's')))
_METHODS = {}        # (channel, exchange, routing key, mandatory) -> basic.publish frame
_METHODS_MAX = 4096  # routing keys can be many (one per user): a bounded cache
_Q = Struct('>Q')
_BYTE = tuple(bytes((n,)) for n in range(256))


class HookUnavailable(Exception):
    """FastPath cannot take over this connection (see ``_pyamqp``)."""


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
    for name, kind in layout(flags):
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


#: A kazoo_green reply's property flags and first two properties (then its correlation id).
_REPLY_PROPERTIES = pack('>H', _REQUEST_FLAGS) + _JSON_UTF8
_REPLY_PROPERTIES_SIZE = len(_REPLY_PROPERTIES)


class FastPath(object):
    """Buffered reads and the hot frames for one open py-amqp connection (TCP or TLS)."""

    def __init__(self, connection, blocking=False):
        transport = connection.transport
        why = hooks.check(transport)
        if why is None and not isinstance(connection.on_inbound_frame, FrameHandler):
            why = "the connection was not made with kazoo_green's frame handler"
        sock = transport.sock
        tls = getattr(sock, 'pending', None) is not None
        if why is not None:
            raise HookUnavailable(why)
        self.connection = connection
        self.transport = transport
        self.sock = sock
        self.tls = tls
        self.frame_max = connection.frame_max
        self.blocking = blocking
        self._handler = connection.on_inbound_frame
        self._fileno = fd = sock.fileno()
        if tls:
            self._recv, self._send = self._tls_recv, self._tls_send
        else:
            self._recv, self._send = partial(os.read, fd), partial(os.write, fd)
        self._poller = _poll()
        self._poller.register(fd, _POLLIN)
        self._out_poller = None
        #: Seconds a write may wait for the socket to drain (None: no limit).
        self.write_timeout = None
        # Whatever py-amqp had read ahead (nothing normally: it reads exact sizes).
        self._buf = bytearray(hooks.take_read_ahead(transport))
        self._pos = 0
        hooks.serve_reads(transport, self._read_frame)
        if blocking:
            hooks.route_writes(transport, self._write)  # py-amqp's frames wait in poll(2)

    # -- the socket -----------------------------------------------------
    def _tls_recv(self, size):
        """Decrypted bytes now, without waiting (BlockingIOError if none)."""
        sock = self.sock
        timeout = sock.gettimeout()
        sock.settimeout(0.0)   # no other greenlet runs until it is restored
        try:
            return sock.recv(size)
        except _SSL_WANT:
            raise BlockingIOError() from None
        finally:
            sock.settimeout(timeout)

    def _tls_send(self, data):
        """Encrypt and send what the socket takes now; 0 if it takes nothing."""
        sock = self.sock
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            return sock.send(data)
        except _SSL_WANT:
            return 0
        finally:
            sock.settimeout(timeout)

    # -- reading --------------------------------------------------------
    def _fill(self, timeout):
        """Append what the socket has, waiting up to ``timeout`` (None: no limit) for it
        to be readable; socket.timeout if it was not. Returns False when it was readable
        but gave no data (a TLS record of TLS's own, e.g. a session ticket): the caller
        looks again.

        The socket's own timeout is never changed for longer than one call: writers on
        other greenlets share it.
        """
        if not (self.tls and self.sock.pending()):
            if self.blocking:
                ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
                if not self._poller.poll(ms):
                    raise socket.timeout()
            else:
                wait_read(self._fileno, timeout)
        return self.fill_now()

    def fill_now(self):
        """Append what the socket has now, without waiting (a caller whose poll(2) found
        it readable); False if it gave nothing. OSError if the broker closed it."""
        try:
            data = self._recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        if not data:
            self.transport.connected = False
            raise OSError('Server unexpectedly closed connection')
        buf = self._buf
        pos = self._pos
        if pos and (pos == len(buf) or (pos > _CHUNK and pos * 2 > len(buf))):
            del buf[:pos]   # all read (the usual case), or much: start over
            self._pos = 0
        buf += data
        return True

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
        return (len(self._buf) - self._pos >= 8 or bool(self._poller.poll(0))
                or (self.tls and self.sock.pending() > 0))

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
        pending = self._handler.pending
        while True:
            pos = self._pos
            if len(buf) - pos >= 8:
                whole = None if pending else self._whole_at(pos)
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
        """Handle every complete frame, reading (up to ``timeout``) until there was one
        or the socket was readable without data; returns how many there were.

        Raises socket.timeout when nothing arrived in time.
        """
        deadline = None if timeout is None else monotonic() + timeout
        handled = self._frames()
        while not handled:
            if not self._fill(None if deadline is None else max(0.0, deadline - monotonic())):
                return 0
            handled = self._frames()
        return handled

    def _frames(self, limit=-1, lane=None):
        """Handle the complete frames in the buffer (at most ``limit`` frames or whole
        messages, if given); return how many there were.

        ``lane``: ``(channel id, tag, deliver)``, ``tag`` a consumer tag as the wire has
        it (its length byte first): its whole messages on that channel go to
        ``deliver(delivery_tag, correlation_id, body, bad)`` (``bad`` as
        ``Delivered.bad``) instead of through the handler's callback, with no
        ``Delivered`` made and, for a kazoo_green reply's properties (JSON, UTF-8, a
        correlation id), no properties decoded but the correlation id.
        """
        handled = 0
        handler = self._handler
        pending = handler.pending
        while handled != limit:
            buf = self._buf
            pos = self._pos
            if len(buf) - pos < 8:
                return handled   # not even a frame header (all read, the usual case)
            whole = None if pending else self._whole_at(pos)
            if whole is not None:
                channel, end, header_end, body_at, stop = whole
                self._pos = stop
                self.connection.bytes_recv += 1
                if (lane is not None and channel == lane[0]
                        and buf.startswith(lane[1], pos + 11)):
                    # A reply: its parts cut out here (one function fewer a reply).
                    delivery_tag = _Q.unpack_from(buf, pos + 11 + len(lane[1]))[0]
                    body = bytes(buf[body_at:stop - 1])
                    at = end + 20 + _REPLY_PROPERTIES_SIZE
                    correlation_id = bad = None
                    if (buf.startswith(_REPLY_PROPERTIES, end + 20)
                            and at + 1 + buf[at] == header_end):
                        try:
                            correlation_id = bytes(buf[at + 1:header_end]).decode('utf-8')
                        except UnicodeDecodeError:   # decode_properties says so
                            pass
                    if correlation_id is None:
                        properties, bad = decode_properties(buf, end + 20, header_end)
                        correlation_id = properties.get('correlation_id')
                    lane[2](delivery_tag, correlation_id, body, bad)
                    handled += 1
                    continue
                properties, bad = decode_properties(buf, end + 20, header_end)
                handler.deliver(channel, bytes(buf[pos + 7:end]), properties,
                                bytes(buf[body_at:stop - 1]), bad)
                handled += 1
                continue
            found = self._frame_at(pos)
            if found is None:
                return handled
            frame_type, channel, end = found
            self._pos = end + 1
            handler((frame_type, channel, bytes(buf[pos + 7:end])))
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
                or buf[pos + 7:pos + 11] != DELIVER_SIG):
            return None
        frame_type, frame_channel, length, _, _, body_size = \
            _CONTENT_HEADER.unpack_from(buf, header)
        header_end = header + 7 + length
        if (frame_type != 2 or frame_channel != channel or length < 14 or size <= header_end
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

    # -- writing --------------------------------------------------------
    def _write(self, data):
        """Send all of ``data``: straight to the socket, waiting only if it is full.

        Raises socket.timeout after ``write_timeout`` seconds without progress: the
        frame may be cut, so the caller must drop the connection.
        """
        send = self._send
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

    def ack(self, channel_id, delivery_tag, multiple=False):
        """basic.ack of ``delivery_tag`` (``multiple``: and of every earlier one)."""
        self._write(_ACK.pack(1, channel_id, 13, 60, 80, delivery_tag, 1 if multiple else 0,
                              0xce))
        self.connection.bytes_sent += 1

    def reject(self, channel_id, delivery_tag, requeue=False):
        self._write(_ACK.pack(1, channel_id, 13, 60, 90, delivery_tag, 1 if requeue else 0,
                              0xce))
        self.connection.bytes_sent += 1
