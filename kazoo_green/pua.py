"""Kazoo presence payloads into Kamailio's presence, through the ``pua_json`` module.

The C kazoo module's ``kazoo_pua_publish`` (and ``_dialoginfo``, ``_mwi``, ``_presence``)
turn Kazoo's presence events into presentities. Kamailio's ``pua_json`` module does the
same from JSON, but reads its own conventions: it acts only on ``Event-Name: update``
with an ``Event-Package`` of ``dialog``, ``message-summary`` or ``presence``, takes the
presentity from ``From-User``/``From-Realm`` (or ``Presentity-*``), needs a ``Call-ID``
(the presentity's etag) and an integer ``Expires`` (without one the presentity expires at
once and no NOTIFY shows it), and returns 1 whatever it did with a payload it could parse.
These helpers fill what Kazoo's payloads leave implicit, refuse (``InvalidPayload``)
what pua_json would silently drop, and call ``KSR.pua_json.publish``::

    from kazoo_green import pua

    @kz.event_route('kazoo:consumer-event-presence-dialog-update')
    def dialog_update(payload, meta):
        pua.dialoginfo(payload)        # BLF: presence_dialoginfo NOTIFYs the watchers

    @kz.event_route('kazoo:consumer-event-presence-mwi-update')
    def mwi_update(payload, meta):
        pua.mwi(payload)               # MWI: presence_mwi NOTIFYs the watchers

Kamailio needs ``json``, ``pua_json``, ``presence`` and the event packages' modules
(``presence_dialoginfo``, ``presence_mwi``, ``presence_xml``) loaded; with a database
that cannot replace rows (db_sqlite), presence's ``publ_cache`` must be 2 (pua_json
replaces presentities). A handler that raises ``InvalidPayload`` is counted
(``handler_errors``) and, with late acks, the message rejected (dead-lettered with a DLX).
"""

import re

from .errors import InvalidPayload, KazooError
from .wire import dumps

__all__ = ['publish', 'dialoginfo', 'mwi', 'presence', 'pua_json_payload', 'DEFAULT_EXPIRES']

#: Seconds a presentity lives when the payload gives no ``Expires``.
DEFAULT_EXPIRES = 3600

_PACKAGES = {'dialog': 'dialog', 'dialoginfo': 'dialog', 'message-summary': 'message-summary',
             'mwi': 'message-summary', 'presence': 'presence'}
# Kazoo's event names (the C module's kazoo_pua_publish chooses by them).
_BY_EVENT_NAME = {'dialog_update': 'dialog', 'mwi_update': 'message-summary',
                  'update': 'presence', 'presence_update': 'presence'}
_URI = re.compile(r'^\s*(?:"[^"]*"\s*)?<?(?:sips?:)?(?:([^@;>]*)@)?([^;>:]+)')


def _user_realm(uri):
    """(user, realm) of ``sip:user@realm`` / ``user@realm`` / ``<sip:user@realm;...>``."""
    if not isinstance(uri, str) or not uri:
        return None, None
    m = _URI.match(uri)
    if not m:
        return None, None
    return m.group(1) or None, m.group(2) or None


def _text(payload, name):
    value = payload.get(name)
    if value is None or value == '':
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InvalidPayload('%s must be text or a number, not %s' % (name, type(value).__name__))
    return str(value)


def _expires(payload):
    value = payload.get('Expires', DEFAULT_EXPIRES)
    try:
        expires = int(value)
    except (TypeError, ValueError):
        raise InvalidPayload('Expires must be an integer (seconds), not %r' % (value,))
    if expires <= 0:
        # pua_json stores it as expired at once: no watcher would ever see it.
        raise InvalidPayload('Expires must be positive, not %d' % expires)
    return expires


def _presentity(payload, *sides):
    """(user, realm): the first side (field prefix) with both, its URI parsed if needed."""
    for side in sides:
        user, realm = _text(payload, side + '-User'), _text(payload, side + '-Realm')
        uri_user, uri_realm = _user_realm(_text(payload, side))
        user, realm = user or uri_user, realm or uri_realm
        if user and realm:
            return user, realm
    user, realm = _text(payload, 'Username'), _text(payload, 'Realm')
    if user and realm:
        return user, realm
    raise InvalidPayload('no presentity: none of %s gives a user and a realm'
                         % ', '.join(sides + ('Username/Realm',)))


def pua_json_payload(payload, package=None):
    """The payload pua_json reads for Kazoo presence event ``payload`` (a dict): a new
    dict; ``package`` (``dialog``, ``message-summary``, ``presence``) defaults to the one
    ``Event-Package`` or Kazoo's ``Event-Name`` says. Raises InvalidPayload."""
    if not isinstance(payload, dict):
        raise InvalidPayload('a presence payload must be a JSON object')
    if package is None:
        package = (_PACKAGES.get(str(payload.get('Event-Package') or '').lower())
                   or _BY_EVENT_NAME.get(str(payload.get('Event-Name') or '').lower()))
        if package is None:
            raise InvalidPayload('which presence event? Event-Package %r, Event-Name %r'
                                 % (payload.get('Event-Package'), payload.get('Event-Name')))
    else:
        package = _PACKAGES.get(package, package)
        if package not in ('dialog', 'message-summary', 'presence'):
            raise InvalidPayload('unknown presence package %r' % (package,))
    out = dict(payload)
    out['Event-Name'] = 'update'
    out['Event-Package'] = package
    out['Expires'] = _expires(payload)
    if package == 'dialog':
        user, realm = _presentity(payload, 'Presentity', 'From')
        for name in ('From', 'To', 'State', 'Call-ID'):
            if not _text(payload, name):
                raise InvalidPayload('a dialog update needs %s' % name)
        to_user, _ = _user_realm(_text(payload, 'To'))
        out.setdefault('To-User', to_user or '')
    elif package == 'message-summary':
        user, realm = _presentity(payload, 'From', 'To')
        new = _text(payload, 'Messages-New')
        if not new and not _text(payload, 'MWI-Voice-Message'):
            raise InvalidPayload('an MWI update needs Messages-New (or MWI-Voice-Message)')
        if not _text(payload, 'Messages-Waiting'):
            try:
                waiting = bool(new) and float(new) > 0
            except ValueError:
                raise InvalidPayload('Messages-New must be a number, not %r' % (new,))
            out['Messages-Waiting'] = 'yes' if waiting else 'no'
        for name in ('Messages-Saved', 'Messages-Urgent', 'Messages-Urgent-Saved'):
            out.setdefault(name, 0)
        out.setdefault('Message-Account', 'sip:%s@%s' % (user, realm))
        # One presentity per mailbox (the etag): each update replaces the last.
        out.setdefault('Call-ID', 'kazoo-mwi-%s@%s' % (user, realm))
        out.setdefault('From', 'sip:%s@%s' % (user, realm))
    else:
        user, realm = _presentity(payload, 'From')
        to_user, _ = _user_realm(_text(payload, 'To'))
        to_user = _text(payload, 'To-User') or to_user or user
        if not _text(payload, 'State'):
            raise InvalidPayload('a presence update needs State')
        out['To-User'] = to_user
        out.setdefault('Call-ID', 'kazoo-presence-%s@%s' % (user, realm))
    if package != 'dialog' or not _text(payload, 'Presentity-User'):
        out['From-User'], out['From-Realm'] = user, realm
    return out


def _publish(payload, package):
    import KSR  # inside Kamailio (or a test's fake)
    text = dumps(pua_json_payload(payload, package)).decode('utf-8')
    if KSR.pua_json.publish(text) < 0:
        raise KazooError('pua_json could not read the %s update' % (package or 'presence'))
    return 1


def publish(payload):
    """``kazoo_pua_publish``: the package chosen from ``Event-Package``/``Event-Name``."""
    return _publish(payload, None)


def dialoginfo(payload):
    """``kazoo_pua_publish_dialoginfo``: a Kazoo ``dialog_update`` (BLF)."""
    return _publish(payload, 'dialog')


def mwi(payload):
    """``kazoo_pua_publish_mwi``: a Kazoo ``mwi_update`` (message summary)."""
    return _publish(payload, 'message-summary')


def presence(payload):
    """``kazoo_pua_publish_presence``: a Kazoo presence ``update``."""
    return _publish(payload, 'presence')
