"""The zone map: which brokers belong to which zone, and how each zone's brokers are used.

A zone is a set of RabbitMQ servers that Kazoo treats as one place (a data centre). Its
shape says how the servers relate:

* ``cluster``: one RabbitMQ cluster; one connection at a time, round-robin failover
  over its servers (every queue and binding is visible from every node);
* ``standalone``: independent servers, as Kazoo often runs them: subscriptions consume
  from every server at once, publishes and queries use one open server and fail over
  to the next.

The broker list is given as the C module's ``amqp_connection`` values can be pasted::

    'amqp://a;amqp://b'                          # one zone, "local"
    'zone=dc2;kazoo://guest:guest@10.0.0.1:5672' # a C module entry: zone dc2
    ['amqp://a', 'zone=dc2;amqp://b']            # local: a, dc2: b
    {'local': ['amqp://a', 'amqp://b'], 'dc2': 'amqp://c'}
    {'local': {'urls': ['amqp://a', 'amqp://b'], 'shape': 'standalone'}}

In a ``;``-separated string, ``zone=NAME`` puts the URLs after it into zone NAME (until
the next ``zone=``); URLs before any ``zone=`` are in the default zone. ``kazoo://`` and
``kazoos://`` (the C module's schemes) mean ``amqp://`` and ``amqps://``.
"""

from collections import OrderedDict

from . import _defaults as D

__all__ = ['ZoneSpec', 'parse_topology', 'parse_brokers', 'SHAPES']

SHAPES = ('cluster', 'standalone')

_SCHEMES = (('kazoo://', 'amqp://'), ('kazoos://', 'amqps://'))


class ZoneSpec(object):
    """One zone: its name, its broker URLs (in order) and its shape."""

    __slots__ = ('name', 'urls', 'shape')

    def __init__(self, name, urls, shape='cluster'):
        if shape not in SHAPES:
            raise ValueError('zone %r: shape must be one of %s, not %r'
                             % (name, ', '.join(SHAPES), shape))
        if not urls:
            raise ValueError('zone %r has no broker URL' % (name,))
        self.name = name
        self.urls = list(urls)
        self.shape = shape

    def __repr__(self):
        return '<ZoneSpec %s %s %r>' % (self.name, self.shape, self.urls)


def _url(text):
    url = text.strip()
    for alias, scheme in _SCHEMES:
        if url.lower().startswith(alias):
            url = scheme + url[len(alias):]
    # kombu warns about a memory:// URL without a host name.
    return 'memory://localhost/' if url == 'memory://' else url


def _zone_name(text, where):
    name = text.strip()
    if not name or any(c in name for c in ';,\n\t '):
        raise ValueError('bad zone name %r in %r' % (name, where))
    return name


def _entries(text, zone, into):
    """Add the URLs of one ``;``-separated string to ``into`` (zone -> list)."""
    for part in text.split(';'):
        part = part.strip()
        if not part:
            continue
        if part.lower().startswith('zone='):
            zone = _zone_name(part[5:], text)
            continue
        if '://' not in part:
            raise ValueError('not a broker URL: %r (in %r)' % (part, text))
        into.setdefault(zone, []).append(_url(part))


def parse_topology(brokers=None, zone=None, shape='cluster'):
    """``(zones, primary)``: an ordered dict of ZoneSpec by name, and the primary zone's
    name. ``zone`` names the primary zone (default: ``local`` if it exists, else the
    first zone given); ``shape`` is the shape of zones that do not name their own."""
    if brokers is None:
        brokers = D.BROKERS
    default = D.ZONE
    found = OrderedDict()
    shapes = {}
    if isinstance(brokers, str):
        _entries(brokers, default, found)
    elif isinstance(brokers, dict):
        for name, value in brokers.items():
            name = _zone_name(str(name), brokers)
            if isinstance(value, dict):
                unknown = set(value) - {'urls', 'shape'}
                if unknown:
                    raise ValueError('zone %r: unknown keys %s (urls, shape)'
                                     % (name, ', '.join(sorted(map(str, unknown)))))
                if 'shape' in value:
                    shapes[name] = value['shape']
                value = value.get('urls')
            if isinstance(value, str):
                value = [value]
            for text in value or ():
                if not isinstance(text, str):
                    raise ValueError('zone %r: broker URLs must be text, not %r'
                                     % (name, text))
                here = OrderedDict()
                _entries(text, name, here)
                if set(here) - {name}:
                    raise ValueError('zone %r: an entry names another zone: %r' % (name, text))
                found.setdefault(name, []).extend(here.get(name, ()))
            found.setdefault(name, [])
    else:
        for text in brokers:
            if not isinstance(text, str):
                raise ValueError('broker URLs must be text, not %r' % (text,))
            _entries(text, default, found)
    if not any(found.values()):
        raise ValueError('no broker URL given')
    zones = OrderedDict()
    for name, urls in found.items():
        zones[name] = ZoneSpec(name, urls, shapes.get(name, shape))
    if zone is None:
        primary = default if default in zones else next(iter(zones))
    else:
        primary = zone
        if primary not in zones:
            raise ValueError('primary zone %r has no brokers (zones: %s)'
                             % (zone, ', '.join(zones)))
    return zones, primary


def parse_brokers(brokers):
    """The broker URLs of a one-zone list (a list or a ``;``-separated string)."""
    zones, primary = parse_topology(brokers)
    return zones[primary].urls
