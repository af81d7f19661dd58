"""A minimal Kazoo node: the SIP edge of a Kazoo cluster, in Python (app_python3 / KEMI).

* REGISTER: challenged (401) for the To domain; a digest with this instance's nonce is
  checked against the password Kazoo gives: an async ``directory``/``authn_req`` to
  exchange ``registrar``, routing key ``authn.endpoint.req.<realm>``. ``authn_resp``:
  the digest checked with the clear-text ``Auth-Password`` (auth's ``pv_auth_check``),
  the contact saved (usrloc), 200, the password (and ``Custom-Channel-Vars``) cached in
  htable ``auth_cache`` under ``<user>@<realm>`` (a re-REGISTER within the cache's
  lifetime asks nothing), and ``directory``/``reg_success`` published (``registration.
  success.<realm>.<user>``). Wrong password: 401; ``authn_err``: 403; no reply in
  time: 503.
* ``directory``/``reg_flush`` (exchange ``registrar``, ``registration.flush.*``): the
  user's cached password and contacts dropped (no ``Username``: every user of the
  ``Realm``; ``Cache-Only: true``: only the cached passwords).
* Media servers: ``nodes``/``advertise`` heartbeats (exchange ``nodes``, fanout) list
  ``Media-Servers.<name>.Interfaces.<profile>.info.url``; each becomes a destination of
  dispatcher set 1, removed when no heartbeat renewed it within the heartbeat's
  ``Expires`` (ms). The node advertises itself every KAZOO_NODE_ADVERTISE seconds.
* INVITE (not in a dialog): 407, then the same authn query (``Method`` INVITE); on
  success relayed to a set-1 destination with ``X-AUTH-Token: <Authorizing-ID>@<Account-ID>``
  (from ``Custom-Channel-Vars``); ``authn_err``: 403; no media server: 480.
* SUBSCRIBE ``dialog`` (BLF), ``message-summary`` (MWI), ``presence``: Kamailio's
  presence module answers and NOTIFYs; for MWI a ``presence``/``mwi_query`` is published
  (``mwi_queries.<realm>``). Kazoo's ``presence``/``dialog_update``, ``mwi_update`` and
  ``update`` events (exchange ``presence``) become presentities through pua_json
  (``kazoo_green.pua``), which NOTIFYs the watchers.

Environment: KAZOO_GREEN_BROKERS (``;``-separated URLs, as in the first example),
KAZOO_GREEN_NODE, KAZOO_GREEN_ZONE (default ``local``), KAZOO_GREEN_CTL (kamcmd's
socket), KAZOO_NODE_DB (the SQLite file, an absolute path; created with Kamailio's own
schema when missing; default /tmp/kazoo-node.sqlite), KAZOO_NODE_ADVERTISE (seconds
between this node's heartbeats, default 10), KAZOO_NODE_AUTH_CACHE (``0``: cache no
password, every REGISTER asks Kazoo), KAZOO_GREEN_QUERY_TIMEOUT (seconds, default
2), KAZOO_GREEN_VENV (the virtualenv holding kazoo_green, default the project's ``.venv``).
"""

import glob
import os
import re
import sqlite3
import sys
import uuid


def _use_project_packages():
    """Make kazoo_green importable by the Python Kamailio embeds (see README)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    venv = os.environ.get('KAZOO_GREEN_VENV') or os.path.join(root, '.venv')
    pattern = os.path.join(venv, 'lib', 'python%d.%d' % sys.version_info[:2], 'site-packages')
    for site in glob.glob(pattern) + [root]:
        if site not in sys.path:
            sys.path.insert(0, site)


_use_project_packages()

import gevent  # noqa: E402
import simplejson as json  # noqa: E402
from time import monotonic  # noqa: E402

import kazoo_green  # noqa: E402,F401  (before kombu: applies gevent's patching)
import kazoo_green.kemi as kemi  # noqa: E402
from kazoo_green import InvalidPayload, KazooError, Overloaded, encode, pua  # noqa: E402

import KSR  # noqa: E402

DB = os.environ.get('KAZOO_NODE_DB') or '/tmp/kazoo-node.sqlite'
SCHEMA_DIR = '/usr/share/kamailio/db_sqlite'   # Debian's kamailio-sqlite-modules
ADVERTISE = float(os.environ.get('KAZOO_NODE_ADVERTISE') or 10)
# 0: no password cached (every REGISTER asks Kazoo); else the htable's own lifetime.
USE_AUTH_CACHE = os.environ.get('KAZOO_NODE_AUTH_CACHE', '1') != '0'
MEDIA_SET = 1
AUTH_CACHE = 'auth_cache'
# auth module: qop=auth in challenges; 16 adds stale=true (a nonce that expired)
CHALLENGE, STALE = 1, 16
# pv_auth_check: the digest's user must be the From user (and To for REGISTER)
CHECK_ID = 1
AUTH_OK, AUTH_INVALID_PASSWORD, AUTH_STALE_NONCE = 1, -2, -4

kz = kemi.Kazoo(os.environ.get('KAZOO_GREEN_BROKERS', 'amqp://guest:guest@127.0.0.1:5672//'),
                app_name='kamailio', node=os.environ.get('KAZOO_GREEN_NODE') or None,
                query_timeout=float(os.environ.get('KAZOO_GREEN_QUERY_TIMEOUT', '2.0')),
                ssl=kazoo_green.ssl_from_env(),
                zone=os.environ.get('KAZOO_GREEN_ZONE') or None)


def create_database(path=DB, schema_dir=SCHEMA_DIR):
    """The SQLite file usrloc writes to, with Kamailio's own schema (version table and
    location tables), when it does not exist yet."""
    if os.path.exists(path):
        return False
    tmp = path + '.new'
    with sqlite3.connect(tmp) as db:
        for name in ('standard', 'usrloc'):
            with open(os.path.join(schema_dir, '%s-create.sql' % name)) as f:
                db.executescript(f.read())
    os.rename(tmp, path)
    return True


# -- Kazoo's events ---------------------------------------------------------------

@kz.event_route('kazoo:consumer-event-presence-dialog-update')
def dialog_update(payload, meta):
    pua.dialoginfo(payload)


@kz.event_route('kazoo:consumer-event-presence-mwi-update')
def mwi_update(payload, meta):
    pua.mwi(payload)


@kz.event_route('kazoo:consumer-event-presence-update')
def presence_update(payload, meta):
    pua.presence(payload)


@kz.event_route('kazoo:consumer-event-directory-reg-flush')
def reg_flush(payload, meta):
    """A user's (or, with no Username, a whole realm's) cached passwords and contacts."""
    user, realm = payload.get('Username') or '', payload.get('Realm')
    if not (isinstance(user, str) and isinstance(realm, str) and realm):
        raise InvalidPayload('reg_flush needs Realm (and Username or none), got %r / %r'
                             % (user, realm))
    cache_only = str(payload.get('Cache-Only', '')).lower() == 'true'
    if user:
        KSR.htable.sht_rm(AUTH_CACHE, '%s@%s' % (user, realm))
        aors = ['%s@%s' % (user, realm)]
    else:
        KSR.htable.sht_rm_name_re(AUTH_CACHE, '^.*@%s$' % re.escape(realm))
        aors = [] if cache_only else realm_aors(realm)
    if not cache_only:
        for aor in aors:
            KSR.registrar.unregister('location', 'sip:' + aor)
    KSR.info('reg_flush: %s@%s dropped%s\n' % (user or '*', realm,
                                                ' (cache only)' if cache_only else ''))


def realm_aors(realm):
    """The registered AoRs of ``realm`` (usrloc's ul.dump)."""
    body = rpc('ul.dump', 'brief') or ''
    suffix = '@' + realm
    return sorted({aor for aor in re.findall(r'"AoR"\s*:\s*"([^"]+)"', body)
                   if aor.endswith(suffix)})


def rpc(method, *params):
    """Kamailio's RPC ``method`` from the script (jsonrpcs): the reply's JSON text, or
    None (logged) when it failed."""
    KSR.jsonrpcs.exec(json.dumps({'jsonrpc': '2.0', 'method': method, 'params': list(params),
                                  'id': 1}))
    code = KSR.pv.get('$jsonrpl(code)')
    if code is None or int(code) != 200:
        KSR.err('%s %s: %s\n' % (method, params, KSR.pv.get('$jsonrpl(body)')))
        return None
    return KSR.pv.get('$jsonrpl(body)')


class MediaServers(object):
    """Dispatcher set 1 kept from Kazoo's heartbeats (in the consumer process, which
    consumes them): URL -> when it expires."""

    def __init__(self):
        self.expiry = {}

    def advertised(self, payload):
        servers = payload.get('Media-Servers')
        if not servers:
            return
        if not isinstance(servers, dict):
            raise InvalidPayload('Media-Servers must be an object')
        try:
            lifetime = float(payload.get('Expires')) / 1000.0
        except (TypeError, ValueError):
            raise InvalidPayload('an advertise with Media-Servers needs Expires (ms), not %r'
                                 % (payload.get('Expires'),))
        until = monotonic() + lifetime
        for name, server in servers.items():
            interfaces = server.get('Interfaces') if isinstance(server, dict) else None
            for profile in (interfaces or {}).values():
                info = profile.get('info') if isinstance(profile, dict) else None
                url = (info or {}).get('url') or (profile or {}).get('URL')
                if not isinstance(url, str) or not url.startswith('sip'):
                    continue
                url = _host_uri(url)
                if url not in self.expiry and rpc('dispatcher.add', MEDIA_SET, url) is not None:
                    KSR.info('media server %s (%s) added to set %d\n' % (url, name, MEDIA_SET))
                self.expiry[url] = until

    def expire_forever(self, interval=0.25):
        while True:
            gevent.sleep(interval)
            now = monotonic()
            for url, until in list(self.expiry.items()):
                if until <= now:
                    del self.expiry[url]
                    rpc('dispatcher.remove', MEDIA_SET, url)
                    KSR.info('media server %s expired: removed from set %d\n'
                             % (url, MEDIA_SET))


def _host_uri(url):
    """``sip:mod_sofia@10.0.0.1:5060`` -> ``sip:10.0.0.1:5060`` (as Kazoo's nodes role)."""
    scheme, _, rest = url.partition(':')
    return '%s:%s' % (scheme, rest.split('@', 1)[-1])


media = MediaServers()


@kz.event_route('kazoo:consumer-event-nodes-advertise')
def advertise(payload, meta):
    media.advertised(payload)


def advertise_forever():
    """This node's own heartbeat on ``nodes``."""
    while True:
        try:
            kz.publish('nodes', kz.node, {
                'Event-Category': 'nodes', 'Event-Name': 'advertise', 'Node': kz.node,
                'Expires': int(ADVERTISE * 3 * 1000), 'Roles': {'Proxy': {}, 'Registrar': {},
                                                                'Presence': {}}})
        except KazooError as exc:
            KSR.warn('node advertise not sent: %s\n' % exc)
        gevent.sleep(ADVERTISE)


# -- SIP ----------------------------------------------------------------------------

class Node(kemi.Handler):

    def ksr_request_route(self, msg):
        if KSR.maxfwd.process_maxfwd(10) < 0:
            KSR.sl.sl_send_reply(483, 'Too Many Hops')
            return 1
        method = KSR.pv.get('$rm')
        if method == 'ACK':
            if KSR.tm.t_check_trans() >= 0:
                return 1   # of a negative reply tm sent or relayed: tm absorbed it
            if KSR.pv.get('$tt'):
                KSR.forward()   # the ACK of a 2xx, end to end
            return 1
        if method == 'CANCEL':
            if KSR.tm.t_check_trans() > 0:
                KSR.tm.t_relay()
            return 1
        if method == 'REGISTER':
            return self.register()
        if method == 'SUBSCRIBE':
            return self.subscribe()
        if KSR.pv.get('$tt'):   # in a dialog (no Record-Route: only strays come here)
            if KSR.tm.t_relay() < 0:
                KSR.sl.sl_send_reply(500, 'Server Error')
            return 1
        if method == 'INVITE':
            return self.invite()
        if method == 'OPTIONS':
            KSR.sl.sl_send_reply(200, 'OK')
            return 1
        KSR.sl.sl_send_reply(501, 'Not Implemented')
        return 1

    # -- digest auth, answered by Kazoo --------------------------------------------
    @staticmethod
    def realm():
        return KSR.pv.get('$td' if KSR.pv.get('$rm') == 'REGISTER' else '$fd') or ''

    def authenticate(self, method):
        """Challenge, or check the cache, or ask Kazoo (async)."""
        realm = self.realm()
        # A random password: -2 (wrong password) means a well-formed digest with a
        # nonce of ours; anything else (none, stale, foreign) gets a challenge.
        result = KSR.auth.pv_auth_check(realm, uuid.uuid4().hex, 0, CHECK_ID)
        if result != AUTH_INVALID_PASSWORD:
            return self.challenge(realm, result)
        user = KSR.pv.get('$au') or ''
        # REGISTERs only: every call is authorized by Kazoo (which knows its limits).
        cached = USE_AUTH_CACHE and method == 'REGISTER' and \
            KSR.htable.sht_get(AUTH_CACHE, '%s@%s' % (user, realm))
        if cached:
            entry = json.loads(cached)
            if KSR.auth.pv_auth_check(realm, entry['Auth-Password'], 0, CHECK_ID) == AUTH_OK:
                return self.save(entry.get('Custom-Channel-Vars') or {})
            KSR.htable.sht_rm(AUTH_CACHE, '%s@%s' % (user, realm))  # changed: ask again
        payload = {
            'Event-Category': 'directory', 'Event-Name': 'authn_req', 'Method': method,
            'Auth-User': user, 'Auth-Realm': realm, 'Auth-Nonce': KSR.pv.get('$adn'),
            'From': KSR.pv.get('$fu'), 'To': KSR.pv.get('$tu'),
            'Orig-IP': KSR.pv.get('$si'), 'Orig-Port': str(KSR.pv.get('$sp')),
            'User-Agent': KSR.pv.get('$ua') or '', 'Contact': KSR.pv.get('$hdr(Contact)') or '',
            'Call-ID': KSR.pv.get('$ci')}
        try:
            kz.async_query('registrar', 'authn.endpoint.req.%s' % encode(realm), payload,
                           on_reply='authn_reply', on_timeout='authn_timeout')
        except Overloaded:
            KSR.sl.sl_send_reply(503, 'Service Unavailable')
        except KazooError as exc:
            KSR.err('authn_req for %s@%s failed: %s\n' % (user, realm, exc))
            KSR.sl.sl_send_reply(500, 'Server Error')
        return 1

    @staticmethod
    def challenge(realm, result=None):
        flags = CHALLENGE | (STALE if result == AUTH_STALE_NONCE else 0)
        if KSR.auth.auth_challenge(realm, flags) < 0:
            KSR.sl.send_reply(500, 'Server Error')
        return 1

    def authn_reply(self, msg):
        """Resumed (a consumer process) with Kazoo's answer."""
        reply = kz.reply()
        name = reply.get('Event-Name')
        realm = self.realm()
        if name == 'authn_resp' and isinstance(reply.get('Auth-Password'), str):
            password = reply['Auth-Password']
            if KSR.auth.pv_auth_check(realm, password, 0, CHECK_ID) != AUTH_OK:
                return self.challenge(realm)   # a wrong password: try again
            ccvs = reply.get('Custom-Channel-Vars')
            ccvs = ccvs if isinstance(ccvs, dict) else {}
            if USE_AUTH_CACHE:
                KSR.htable.sht_sets(AUTH_CACHE, '%s@%s' % (KSR.pv.get('$au'), realm),
                                    json.dumps({'Auth-Password': password,
                                                'Custom-Channel-Vars': ccvs}))
            if KSR.pv.get('$rm') == 'REGISTER':
                return self.save(ccvs)
            return self.route_invite(ccvs)
        KSR.tm.t_reply(403, 'Forbidden')
        return 1

    def authn_timeout(self, msg):
        KSR.tm.t_reply(503, 'Service Unavailable')
        return 1

    # -- REGISTER ------------------------------------------------------------------
    def register(self):
        if not KSR.pv.get('$tU'):
            KSR.sl.sl_send_reply(400, 'Bad Request')
            return 1
        return self.authenticate('REGISTER')

    def save(self, ccvs):
        # Replies itself: statelessly (cache hit, the request route) or through tm (resumed)
        result = KSR.registrar.save('location', 0)
        if result < 0:
            KSR.sl.send_reply(500, 'Server Error')
            return 1
        realm, user = KSR.pv.get('$td'), KSR.pv.get('$tU')
        contact = KSR.pv.get('$hdr(Contact)') or ''
        # 3: a contact deleted; or an Expires: 0 for a contact not registered (nothing done)
        gone = result == 3 or (KSR.pv.get('$hdr(Expires)') or '').strip() == '0' \
            or ';expires=0' in contact.replace(' ', '').lower()
        expires = 0 if gone else int(KSR.pv.get('$xavp(ulrcd=>expires)') or 0)
        payload = {
            'Event-Category': 'directory', 'Event-Name': 'reg_success',
            'Status': 'Unregistered' if gone else 'Registered', 'Expires': expires,
            'Contact': contact, 'Call-ID': KSR.pv.get('$ci'), 'Realm': realm, 'Username': KSR.pv.get('$au') or user,
            'From-User': KSR.pv.get('$fU'), 'From-Host': KSR.pv.get('$fd'),
            'To-User': user, 'To-Host': realm, 'User-Agent': KSR.pv.get('$ua') or '',
            'Custom-Channel-Vars': ccvs, 'Source-IP': KSR.pv.get('$si'),
            'Source-Port': str(KSR.pv.get('$sp'))}
        try:
            kz.publish('registrar', 'registration.success.%s.%s' % (encode(realm), encode(user)),
                       payload)
        except KazooError as exc:
            KSR.err('reg_success for %s@%s not published: %s\n' % (user, realm, exc))
        return 1

    # -- INVITE --------------------------------------------------------------------
    def invite(self):
        return self.authenticate('INVITE')

    def route_invite(self, ccvs):
        """Resumed with Kazoo's authorization: to a media server."""
        reply = KSR.tm.t_reply
        if KSR.dispatcher.ds_list_exists(MEDIA_SET) < 0 or \
                KSR.dispatcher.ds_select_dst(MEDIA_SET, 4) < 0:
            reply(480, 'Temporarily Unavailable')
            return 1
        KSR.auth.consume_credentials()
        token = '%s@%s' % (ccvs.get('Authorizing-ID', ''), ccvs.get('Account-ID', ''))
        KSR.hdr.append('X-AUTH-Token: %s\r\n' % token)
        KSR.tm.t_on_failure('media_failure')
        if KSR.tm.t_relay() < 0:
            reply(500, 'Server Error')
        return 1

    def media_failure(self, msg):
        """A media server did not answer (or failed): the next one of set 1, if any."""
        if KSR.tm.t_is_canceled() > 0:
            return 1
        if KSR.tm.t_check_status('408|5[0-9][0-9]') > 0 and KSR.dispatcher.ds_next_dst() > 0:
            KSR.tm.t_on_failure('media_failure')
            KSR.tm.t_relay()
        return 1

    # -- presence ------------------------------------------------------------------
    def subscribe(self):
        event = (KSR.pv.get('$hdr(Event)') or '').split(';', 1)[0].strip()
        if event not in ('dialog', 'message-summary', 'presence'):
            KSR.sl.sl_send_reply(489, 'Bad Event')
            return 1
        initial = not KSR.pv.get('$tt')
        if KSR.presence.handle_subscribe() < 0:
            return 1   # presence answered the error
        if event == 'message-summary' and initial:
            user, realm = KSR.pv.get('$rU') or '', KSR.pv.get('$rd') or ''
            try:
                kz.publish('presence', 'mwi_queries.%s' % encode(realm), {
                    'Event-Category': 'presence', 'Event-Name': 'mwi_query',
                    'Username': user, 'Realm': realm, 'Call-ID': KSR.pv.get('$ci')})
            except KazooError as exc:
                KSR.err('mwi_query for %s@%s not published: %s\n' % (user, realm, exc))
        return 1

    # -- the consumer process ------------------------------------------------------
    def kazoo_consumer(self, msg, evname=None):
        gevent.spawn(media.expire_forever)
        gevent.spawn(advertise_forever)
        return super(Node, self).kazoo_consumer(msg, evname)

    def ksr_xhttp_event(self, msg, evname=None):
        """/metrics: xhttp_prom's Prometheus text."""
        if KSR.xhttp_prom.check_uri() > 0:
            KSR.xhttp_prom.dispatch()
        else:
            KSR.xhttp.xhttp_reply(404, 'Not Found', 'text/plain', 'try /metrics\n')
        return 1


def mod_init():
    # Before Kamailio forks (and before usrloc opens it): the database; registrations.
    if create_database():
        KSR.info('created %s with Kamailio\'s schema\n' % DB)
    kz.subscribe('registrar', 'registration.flush.*', exchange_type='topic', ack='late')
    kz.subscribe('presence', ['dialog.*.*', 'mwi_updates.*.*', 'update.*.*'],
                 exchange_type='topic', ack='late', worker_key='routing_key')
    kz.subscribe('nodes', kz.node, exchange_type='fanout', ack='early')
    return Node(kz)
