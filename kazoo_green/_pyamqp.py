"""The one place that reaches into py-amqp's private parts (for FastPath only).

FastPath (``_amqpfast``) reads the socket in large chunks and serves py-amqp's frame
reads from its own buffer; on blocking links (SIP workers) it also takes py-amqp's
writes, so they wait in poll(2). py-amqp has no public hook for either. These three
private attributes of a py-amqp transport are the only ones kazoo_green touches, and
only here:

* ``transport._read_buffer``: bytes py-amqp has read ahead, taken over once;
* ``transport.read_frame``, replaced on the instance: how py-amqp reads a frame;
* ``transport._write``: what ``transport.write`` sends through (blocking links).

Everything else kazoo_green uses of py-amqp and kombu is public: the ``frame_handler``
argument of ``amqp.Connection`` (``_deliver``), ``Connection.channels``,
``bytes_sent``/``bytes_recv`` (py-amqp's heartbeat bookkeeping), ``transport.sock`` and
``transport.connected``.

``check(transport)`` says why FastPath cannot use a transport (None when it can); the
Link then runs without FastPath, as with ``Kazoo(fast=False)``, and logs why once.
``tests/unit/test_pyamqp_contract.py`` checks what these hooks do on a real py-amqp
transport, so an upgrade that changes them fails loudly there. Supported: the py-amqp
versions ``requirements.txt`` allows (``SUPPORTED``).
"""

import amqp

__all__ = ['check', 'take_read_ahead', 'serve_reads', 'route_writes', 'SUPPORTED',
           'supported_version']

#: py-amqp versions whose private hooks are known to behave as FastPath needs:
#: [lowest, first unsupported), as in requirements.txt.
SUPPORTED = ((5, 4, 2), (5, 5))


def _version():
    parts = []
    for piece in amqp.__version__.split('.')[:3]:
        digits = ''.join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def supported_version():
    """Whether the installed py-amqp is within SUPPORTED."""
    return SUPPORTED[0] <= _version() < SUPPORTED[1]


def check(transport):
    """None if FastPath can take over ``transport``'s reads (and writes), else why not."""
    for name in ('_read_buffer', '_write', 'read_frame', 'write', 'sock'):
        if not hasattr(transport, name):
            return 'py-amqp %s transport has no %r' % (amqp.__version__, name)
    if not isinstance(transport._read_buffer, (bytes, bytearray)):
        return 'py-amqp %s: transport._read_buffer is a %s' % (
            amqp.__version__, type(transport._read_buffer).__name__)
    return None


def take_read_ahead(transport):
    """The bytes py-amqp read ahead of the last frame it returned (its buffer is emptied:
    from now on FastPath's buffer holds the stream)."""
    data = bytes(transport._read_buffer or b'')
    transport._read_buffer = b''
    return data


def serve_reads(transport, read_frame):
    """Make py-amqp read its frames with ``read_frame()`` (``(type, channel, payload)``)."""
    transport.read_frame = read_frame


def route_writes(transport, write):
    """Make py-amqp send what it writes (``transport.write``) with ``write(data)``."""
    transport._write = write
