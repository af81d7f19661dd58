"""The Kazoo message conventions: JSON bodies, envelope, routing-key escaping, route names."""

import os
import random
from time import time

import orjson
import simplejson

from . import _defaults as D
from .errors import BadMessage, InvalidPayload

__all__ = [
    'encode', 'json_path', 'dumps', 'loads_payload', 'to_payload', 'stamp',
    'route_names', 'normalise_route', 'current_pid', 'stamp_received',
]

_KEEP = frozenset(b'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-~_')
# One table lookup a byte: kept bytes map to themselves, the rest to %XX.
_ENCODE = tuple(
    chr(b) if b in _KEEP else ('+' if b == 0x20 else '%%%02X' % b)
    for b in range(256)
)


#: The C module's limit on kazoo_encode's input, in bytes (MAX_ROUTING_KEY_SIZE).
ENCODE_MAX = 255


def encode(value):
    """Escape ``value`` for use as one word of a routing key (the C ``kazoo_encode``).

    Letters, digits, ``-``, ``~`` and ``_`` are kept, a space becomes ``+``,
    every other byte of the UTF-8 text (``.`` included) becomes ``%XX``; a value
    that is exactly ``#`` or ``*`` is kept (a binding can be built from it). As in
    the C module, an input longer than 255 bytes raises ValueError, and the
    result ends at the escape that reaches 255 bytes (so it is at most 257 long).
    Bytes from 0x80 up are written ``%XX`` (the C module garbles them: see the
    README's parity table).

    >>> encode('sip.example.com')
    'sip%2Eexample%2Ecom'
    >>> encode('a b@c')
    'a+b%40c'
    >>> encode('*')
    '*'
    """
    if isinstance(value, str):
        value = value.encode('utf-8')
    elif not isinstance(value, (bytes, bytearray)):
        value = str(value).encode('utf-8')
    if len(value) > ENCODE_MAX:
        raise ValueError('kazoo_encode: input of %d bytes is longer than %d'
                         % (len(value), ENCODE_MAX))
    if value == b'#' or value == b'*':
        return value.decode('ascii')
    out = ''.join([_ENCODE[b] for b in value])
    if len(out) > ENCODE_MAX:
        # The C loop stops once ENCODE_MAX or more bytes are written: cut after the
        # escape (1 or 3 bytes) that got there.
        written = 0
        for b in value:
            written += len(_ENCODE[b])
            if written >= ENCODE_MAX:
                break
        out = out[:written]
    return out


_MISSING = object()
#: Written inside a json_path key for a dot that is part of the key (the C module's
#: ``json_escape_char``, ``%`` by default).
JSON_ESCAPE = '%'


def _path_parts(path, escape=JSON_ESCAPE):
    """``Channels[0].switch_url`` -> ['Channels', 0, 'switch_url']; ``escape`` in a key
    stands for a dot (``a%b.c`` -> ['a.b', 'c'])."""
    parts = []
    for word in path.split('.'):
        name, _, rest = word.partition('[')
        if name:
            parts.append(name.replace(escape, '.') if escape else name)
        while rest:
            index, _, rest = rest.partition(']')
            try:
                parts.append(int(index))
            except ValueError:
                raise ValueError('bad index %r in path %r' % (index, path))
            rest = rest[1:] if rest.startswith('[') else rest
            if rest:
                raise ValueError('bad path %r' % (path,))
    return parts


def json_path(payload, path, default=None, escape=JSON_ESCAPE):
    """Value at ``path`` in ``payload`` (a dict or JSON text), like the C ``kazoo_json``.

    Paths are dotted keys with ``[n]`` list indexes; a negative index counts
    from the end. A dot inside a key is written ``escape`` (``%``, as the C module's
    ``json_escape_char``; None: no escape). A missing key or index, or null,
    gives ``default``.

    >>> json_path({'Channels': [{'switch_url': 'sip:fs1'}]}, 'Channels[0].switch_url')
    'sip:fs1'
    >>> json_path({'Media-Servers': {'fs1.example.com': {'Interfaces': 2}}},
    ...           'Media-Servers.fs1%example%com.Interfaces')
    2
    """
    if isinstance(payload, (str, bytes)):
        payload = simplejson.loads(payload)
    node = payload
    for part in _path_parts(path, escape):
        try:
            if isinstance(part, int):
                node = node[part] if isinstance(node, list) else _MISSING
            else:
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        except IndexError:
            node = _MISSING
        if node is _MISSING:
            return default
    return default if node is None else node


_dumps = simplejson.JSONEncoder(separators=(',', ':'), ensure_ascii=False).encode
_decoder = simplejson.JSONDecoder()
_loads = _decoder.decode
_scan = _decoder.scan_once
_orjson_dumps = orjson.dumps


def dumps(payload):
    """JSON text of ``payload`` as UTF-8 bytes.

    orjson writes it (one C call: a SIP worker runs this with cold caches, where
    simplejson's Python layers cost ~15 µs more); what orjson refuses (integers beyond
    64 bits, non-string keys, Decimal) simplejson writes. The text is the same JSON
    (compact, UTF-8), except that a NaN or infinite float becomes ``null`` (simplejson
    raised ValueError). What neither can write (a set, nesting deeper than Python's
    recursion limit, text that is not valid Unicode) raises InvalidPayload.
    """
    try:
        return _orjson_dumps(payload)
    except TypeError:
        try:
            return _dumps(payload).encode('utf-8')
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidPayload('payload cannot be written as JSON: %s: %s'
                                 % (type(exc).__name__, exc)) from None


def to_payload(payload):
    """A publishable dict from a dict or JSON text; raises InvalidPayload."""
    if isinstance(payload, dict):
        return dict(payload)
    if isinstance(payload, (str, bytes, bytearray)):
        try:
            value = _loads(payload.decode('utf-8') if not isinstance(payload, str) else payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise InvalidPayload('payload is not valid JSON: %s' % exc) from None
        if not isinstance(value, dict):
            raise InvalidPayload('payload must be a JSON object, got %s' % type(value).__name__)
        return value
    raise InvalidPayload('payload must be a dict or JSON text, got %s' % type(payload).__name__)


def loads_payload(body):
    """Decode a consumed body into a dict; raises BadMessage naming the reason."""
    if not body:
        raise BadMessage('empty body')
    if not isinstance(body, str):
        try:
            body = bytes(body).decode('utf-8')
        except UnicodeDecodeError as exc:
            raise BadMessage('invalid UTF-8', str(exc)) from None
    try:
        # simplejson's scanner straight away when the text is just an object (the
        # usual case: fewer layers, which counts with cold caches); decode() else.
        value = None
        if body[0] == '{':
            try:
                value, end = _scan(body, 0)
            except StopIteration:
                end = 0
            if end != len(body) and body[end:].strip():
                value = None
        if value is None:
            value = _loads(body)
    except RecursionError:
        raise BadMessage('not JSON', 'nested too deeply') from None
    except ValueError as exc:
        if 'integer string conversion' in str(exc):
            # Python refuses to read integers of more than sys.get_int_max_str_digits()
            # (4300) digits: the work grows with the square of the length.
            raise BadMessage('not JSON', 'an integer has too many digits') from None
        raise BadMessage('not JSON', str(exc)) from None
    if not isinstance(value, dict):
        raise BadMessage('JSON is not an object', type(value).__name__)
    return value


# Msg-IDs are random (version 4) UUIDs. uuid.uuid4() asks the kernel for 16 bytes on
# every call; a per-process generator seeded from it once is enough for ids (they are
# not secrets) and saves a system call per message. Reseeded in every forked child.
_rng = random.Random()
# uuid.UUID(int=..., version=4): variant bits 10, version nibble 4.
_UUID4_CLEAR = ~((0xc000 << 48) | (0xf000 << 64))
_UUID4_SET = (0x8000 << 48) | (4 << 76)


def new_msg_id():
    """A random UUID (version 4) as text, like ``str(uuid.uuid4())``."""
    h = '%032x' % (_rng.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)
    return '%s-%s-%s-%s-%s' % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def new_token():
    """64 random bits as 16 hex digits: what makes an async query's Msg-ID unique (its
    other parts say what it is for), for less than a UUID's formatting."""
    return '%016x' % _rng.getrandbits(64)


def stamp(payload, app_name, app_version, node, msg_id=None):
    """A copy of ``payload`` (a dict or JSON text, see ``to_payload``) with the envelope
    fields a Kazoo message carries added where absent; ``msg_id``: its Msg-ID, whatever
    the payload had (else a new one where absent)."""
    # A dict is copied here, not in to_payload: one call less for a SIP worker's query.
    payload = dict(payload) if type(payload) is dict else to_payload(payload)
    if 'App-Name' not in payload:
        payload['App-Name'] = app_name
    if 'App-Version' not in payload:
        payload['App-Version'] = app_version
    if 'Node' not in payload:
        payload['Node'] = node
    if msg_id is not None:
        payload['Msg-ID'] = msg_id
    elif 'Msg-ID' not in payload:
        payload['Msg-ID'] = new_msg_id()
    return payload


_ASCII_LOWER = {c: c + 32 for c in range(ord('A'), ord('Z') + 1)}
_ASCII_LOWER[ord('_')] = ord('-')


def stamp_received(payload, zone):
    """Stamp a consumed payload (a delivery, a reply) as the C module does: the zone of the
    connection that received it, and when (epoch seconds, an integer)."""
    payload['AMQP-Broker-Zone'] = zone
    payload['AMQP-Received'] = int(time())
    return payload


def normalise_route(name):
    """Route names are lower-case with ``_`` written as ``-``: A-Z only, as the C
    module's ``tolower`` (so U+212A KELVIN SIGN stays what it is)."""
    return name.translate(_ASCII_LOWER)


def _jsonc(value):
    """``value`` as json-c writes it by default (``json_object_to_json_string``: spaced,
    ``/`` escaped): the text the C module puts in a route name for an object or list."""
    if isinstance(value, dict):
        if not value:
            return '{ }'
        return '{ %s }' % ', '.join('%s: %s' % (_jsonc(str(k)), _jsonc(v))
                                    for k, v in value.items())
    if isinstance(value, list):
        if not value:
            return '[ ]'
        return '[ %s ]' % ', '.join(_jsonc(v) for v in value)
    if isinstance(value, str):
        return simplejson.dumps(value, ensure_ascii=False).replace('/', '\\/')
    if value is None:
        return 'null'
    return _text(value)


def _text(value):
    """A key field's value as the C module reads it (``json_object_get_string``): text up
    to a NUL, numbers in decimal, objects and lists as json-c's text; None for null."""
    if isinstance(value, str):
        return value.split('\x00', 1)[0] if '\x00' in value else value
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (dict, list)):
        return _jsonc(value)
    return None


def route_names(payload, key=None, subkey=None, defaults=(D.EVENT_KEY, D.EVENT_SUBKEY)):
    """Event-route names for ``payload``, most specific first, as the C module makes them:

    1. ``kazoo:consumer-event-<category>-<name>``  (the key fields' values)
    2. ``kazoo:consumer-event-<category>``
    3. ``kazoo:consumer-event-<key>-<subkey>``     (the key fields' names)
    4. ``kazoo:consumer-event-<key>``
    5. ``kazoo:consumer-event``

    lower-cased, ``_`` written as ``-``. ``key``/``subkey`` are a subscription's own
    key fields (None: ``defaults``, the runtime's, ``Event-Category``/``Event-Name``
    unless set: the C module's ``amqp_consumer_event_key``/``_subkey``). A key field
    that is missing, null or empty gives an empty value (so ``{"Event-Category": "cat"}``
    runs ``kazoo:consumer-event-cat`` unless ``kazoo:consumer-event-cat-`` exists, and a
    payload without key fields runs step 3); for a subscription's own key field, the
    empty value is replaced by the field's name. An object or list gives json-c's text
    of it, a string ends at a NUL: all as in the C module. Never raises.

    >>> route_names({'Event-Category': 'directory', 'Event-Name': 'reg_flush'})[0]
    'kazoo:consumer-event-directory-reg-flush'
    >>> route_names({'Event-Name': 'x'})[2]
    'kazoo:consumer-event-event-category-event-name'
    """
    k = key or defaults[0]
    sk = subkey or defaults[1]
    category = _text(payload.get(k)) or key or ''
    name = _text(payload.get(sk)) or subkey or ''
    p = D.ROUTE_PREFIX
    return (
        normalise_route('%s-%s-%s' % (p, category, name)),
        normalise_route('%s-%s' % (p, category)),
        normalise_route('%s-%s-%s' % (p, k, sk)),
        normalise_route('%s-%s' % (p, k)),
        p,
    )


def hostname():
    return os.uname().nodename


_pid = [os.getpid()]
# Kamailio forks in C but runs Python's after-fork hooks (PyOS_AfterFork_Child).
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))
os.register_at_fork(after_in_child=_rng.seed)  # children must not repeat their parent's ids


def current_pid():
    """This process's id without a system call (kept right across forks)."""
    return _pid[0]
