"""The Kazoo node example end to end: examples/kazoo-node in a real Kamailio (auth, usrloc,
registrar, dispatcher, presence, pua_json, db_sqlite), examples/fake_kazoo.py as Kazoo,
real sipp, real RabbitMQ.

One Kamailio, one fake Kazoo and one observer (a kazoo_green runtime bound to the same
exchanges: it sees what the node publishes) serve the module, in this order of tests;
after every test Kamailio must run with all the processes it started with.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

import kazoo_green

from ..conftest import RABBIT_URL, unique, wait_for
from . import harness
from . import kazoo_node_sipp as scen

CFG = os.path.join(harness.ROOT, 'examples', 'kazoo-node', 'kamailio.cfg')
FAKE = os.path.join(harness.ROOT, 'examples', 'fake_kazoo.py')
DOMAIN = scen.DOMAIN
REALM_KEY = kazoo_green.encode(DOMAIN)
USERS = {'alice': 'alice-secret', 'bob': 'bob-secret', 'carol': 'carol-secret',
         'frank': 'frank-secret'}
SILENT = 'silent.example.com'   # the fake Kazoo never answers its authn_req
MEDIA_PORT = 5290


def ids(user, realm=DOMAIN):
    """examples/fake_kazoo.py's (Account-ID, Authorizing-ID)."""
    return (hashlib.md5(realm.encode()).hexdigest(),
            hashlib.md5(('%s@%s' % (user, realm)).encode()).hexdigest())


@pytest.fixture(scope='module')
def fake(logdir):
    missing = [t for t in ('kamailio', 'kamcmd', 'sipp') if not shutil.which(t)]
    assert not missing, 'missing %s: run tests/tools/services.sh' % ', '.join(missing)
    others = harness.rabbit_queues().get('fake-kazoo-authn', (0, 0))[0]
    assert not others, ('%d other fake Kazoo(s) already answer authn_req on this broker: '
                        'stop them (pkill -f fake_kazoo.py)' % others)
    args = [harness.PYTHON, FAKE, '--broker', RABBIT_URL, 'serve', '--silent-realm', SILENT]
    for user, password in USERS.items():
        args += ['--user', '%s:%s@%s' % (user, password, DOMAIN)]
        args += ['--user', '%s:%s@%s' % (user, password, SILENT)]
    log = open(str(logdir / 'fake_kazoo.log'), 'a')
    proc = subprocess.Popen(args, cwd=harness.ROOT, stdout=log, stderr=subprocess.STDOUT)
    assert wait_for(lambda: harness.rabbit_queues().get('fake-kazoo-authn', (0, 0))[0] >= 1,
                    30), 'fake Kazoo did not start; see %s' % (logdir / 'fake_kazoo.log')
    yield proc
    proc.terminate()
    proc.wait(10)


class Observer(object):
    """A runtime bound where Kazoo's apps are: every message the node publishes."""

    def __init__(self):
        self.kz = kazoo_green.Kazoo(RABBIT_URL, node=unique('observer') + '@test')
        self.seen = []   # (route, routing_key, payload)
        self.kz.add_route('kazoo:consumer-event', self._record)
        self.kz.subscribe('registrar', ['authn.endpoint.req.*', 'registration.success.#'],
                          exchange_type='topic')
        self.kz.subscribe('presence', 'mwi_queries.*', exchange_type='topic')
        self.kz.subscribe('nodes', 'observer', exchange_type='fanout')
        self.kz.start()
        assert self.kz.wait_connected(10)

    def _record(self, payload, meta):
        self.seen.append((payload.get('Event-Name'), meta.routing_key, payload))

    def named(self, name, **fields):
        return [(key, p) for n, key, p in list(self.seen) if n == name
                and all(p.get(k) == v for k, v in fields.items())]


@pytest.fixture(scope='module')
def observer():
    o = Observer()
    yield o
    o.kz.stop()


@pytest.fixture(scope='module')
def node(logdir, fake, observer):
    k = harness.Kamailio(str(logdir / 'kamailio-node.log'), cfg=CFG,
                         node='kamailio@kgtest-%s' % unique('node'),
                         env={'KAZOO_NODE_DB': str(logdir / 'kazoo-node.sqlite'),
                              'KAZOO_NODE_ADVERTISE': '1', 'KAZOO_GREEN_HTTP_PORT': '5082'})
    k.http_port = 5082
    k.start()
    yield k
    k.stop()
    subprocess.run(['rabbitmqctl', '-q', 'delete_queue', '%s-resume' % k.node],
                   capture_output=True)


@pytest.fixture(autouse=True)
def node_stays_healthy(request, node):
    yield
    problem = node.health()
    assert problem is None, problem


def ok(result, calls=1):
    assert result.returncode == 0 and result.successful == calls and result.failed == 0, \
        result


def register(user, password=None, final='200', domain=DOMAIN, expires=3600, port=None):
    return scen.Sipp(scen.register(final, domain, expires), service=user, user=user,
                     password=USERS.get(user) if password is None else password,
                     port=port).wait()


def kamcmd(node, *args):
    out = node.kamcmd(*args)
    return out.stdout + out.stderr


def contacts(node, user, domain=DOMAIN):
    return re.findall(r'Address: (\S+)', kamcmd(node, 'ul.lookup', 'location',
                                                  '%s@%s' % (user, domain)))


def cached(node, user, domain=DOMAIN):
    out = kamcmd(node, 'htable.get', 'auth_cache', '%s@%s' % (user, domain))
    return out if 'Auth-Password' in out else None


def settled(node):
    """kazoo_green's statistics once everything so far is in them (see test_kamailio)."""
    first = node.statistics()['pushes']
    assert wait_for(lambda: node.statistics()['pushes'] >= first + 3, 10)
    return node.statistics()


def fake_kazoo(*args):
    out = subprocess.run([harness.PYTHON, FAKE, '--broker', RABBIT_URL] + list(args),
                         cwd=harness.ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out
    return out


# -- REGISTER --------------------------------------------------------------------------

def test_register_without_credentials_is_challenged_for_the_to_domain(node, logdir):
    result = scen.Sipp(scen.register('401', challenged=False, check_realm=True),
                       service='alice').wait()
    ok(result)
    # The database did not exist: the script made it with Kamailio's own schema.
    import sqlite3
    with sqlite3.connect(str(logdir / 'kazoo-node.sqlite')) as db:
        versions = dict(db.execute('select table_name, table_version from version'))
    assert versions.get('location') and 'location_attrs' in versions, versions


def test_register_with_digest_auth_asks_kazoo_saves_the_contact_and_announces(node,
                                                                               observer):
    before = len(observer.named('authn_req'))
    result = register('alice')
    ok(result)
    assert wait_for(lambda: observer.named('reg_success', Username='alice'), 10)
    # The query, as Kazoo's own Kamailio configuration sends it.
    [(key, req)] = observer.named('authn_req')[before:]
    assert key == 'authn.endpoint.req.%s' % REALM_KEY
    assert req['Event-Category'] == 'directory' and req['Method'] == 'REGISTER'
    assert (req['Auth-User'], req['Auth-Realm']) == ('alice', DOMAIN)
    assert re.fullmatch(r'[0-9a-zA-Z+/=]{8,}', req['Auth-Nonce']), req['Auth-Nonce']
    assert req['From'] == req['To'] == 'sip:alice@%s' % DOMAIN
    assert req['Orig-IP'] == '127.0.0.1' and req['Orig-Port'].isdigit()
    assert req['User-Agent'] == 'kazoo-green-e2e'
    assert req['Contact'].startswith('<sip:alice@127.0.0.1:') and req['Call-ID']
    # Saved, cached, announced.
    assert contacts(node, 'alice') and contacts(node, 'alice')[0].startswith('sip:alice@127.0.0.1:')
    assert '"Auth-Password": "alice-secret"' in cached(node, 'alice')
    [(key, reg)] = observer.named('reg_success', Username='alice')
    assert key == 'registration.success.%s.alice' % REALM_KEY
    account, device = ids('alice')
    assert reg['Status'] == 'Registered' and isinstance(reg['Expires'], int)
    assert 3000 <= reg['Expires'] <= 3600
    assert (reg['Realm'], reg['From-User'], reg['From-Host'], reg['To-User'],
            reg['To-Host']) == (DOMAIN, 'alice', DOMAIN, 'alice', DOMAIN)
    assert reg['Custom-Channel-Vars']['Account-ID'] == account
    assert reg['Custom-Channel-Vars']['Authorizing-ID'] == device
    assert reg['Source-IP'] == '127.0.0.1' and reg['Source-Port'].isdigit()
    assert reg['Call-ID'] == req['Call-ID'] and reg['User-Agent'] == 'kazoo-green-e2e'
    assert reg['Contact'].startswith('<sip:alice@127.0.0.1:')


def test_a_re_register_within_the_cache_lifetime_sends_no_query(node, observer):
    before_stats = settled(node)
    before = len(observer.named('authn_req'))
    announced = len(observer.named('reg_success', Username='alice'))
    ok(register('alice'))
    assert wait_for(lambda: len(observer.named('reg_success', Username='alice')) > announced,
                    10)
    after = settled(node)
    assert after['queries'] == before_stats['queries']
    assert len(observer.named('authn_req')) == before
    _, reg = observer.named('reg_success', Username='alice')[-1]
    assert reg['Custom-Channel-Vars']['Account-ID'] == ids('alice')[0]  # from the cache


def test_expires_0_unregisters_and_is_announced_unregistered(node, observer):
    ok(register('frank', port=5298))
    assert contacts(node, 'frank') == ['sip:frank@127.0.0.1:5298']
    ok(register('frank', expires=0, port=5298))   # the same contact
    assert wait_for(lambda: observer.named('reg_success', Username='frank',
                                           Status='Unregistered'), 10), \
        observer.named('reg_success', Username='frank')
    [(_, reg)] = observer.named('reg_success', Username='frank', Status='Unregistered')
    assert reg['Expires'] == 0
    assert contacts(node, 'frank') == []


def test_a_wrong_password_is_challenged_again(node, observer):
    before = len(observer.named('authn_req'))
    ok(register('bob', password='not-bobs', final='401'))
    # Kazoo was asked (the observer's copy may still be on its way)
    assert wait_for(lambda: len(observer.named('authn_req')) == before + 1, 10)
    assert contacts(node, 'bob') == [] and cached(node, 'bob') is None


def test_authn_err_is_forbidden(node, observer):
    ok(register('dave', password='whatever', final='403'))   # unknown to Kazoo
    assert contacts(node, 'dave') == []


def test_no_reply_in_time_is_503(node):
    before = settled(node)
    result = register('alice', domain=SILENT, final='503')
    ok(result)
    assert result.response_ms[0] >= 2000 * 0.95   # the query's timeout (2 s)
    assert settled(node)['queries_timeout'] == before['queries_timeout'] + 1


def test_reg_flush_drops_the_cached_password_and_the_contacts(node, observer):
    assert contacts(node, 'alice') and cached(node, 'alice')
    fake_kazoo('flush', 'alice@%s' % DOMAIN)
    assert wait_for(lambda: not cached(node, 'alice') and not contacts(node, 'alice'), 10)
    before = len(observer.named('authn_req'))
    ok(register('alice'))   # asks again
    assert wait_for(lambda: len(observer.named('authn_req')) == before + 1, 10)
    assert observer.named('authn_req')[-1][1]['Auth-User'] == 'alice'
    assert contacts(node, 'alice')


def test_a_realm_wide_reg_flush_drops_every_user_of_the_realm(node, observer):
    ok(register('bob'))
    ok(register('frank'))
    assert contacts(node, 'alice') and contacts(node, 'bob') and contacts(node, 'frank')
    assert cached(node, 'alice') and cached(node, 'bob')
    fake_kazoo('flush', '--cache-only', DOMAIN)
    assert wait_for(lambda: not cached(node, 'alice') and not cached(node, 'bob'), 10)
    assert contacts(node, 'alice') and contacts(node, 'bob')   # only the cache
    fake_kazoo('flush', DOMAIN)
    assert wait_for(lambda: not (contacts(node, 'alice') or contacts(node, 'bob')
                                 or contacts(node, 'frank')), 10)
    ok(register('alice'))   # asks Kazoo again, registers again
    assert contacts(node, 'alice') and cached(node, 'alice')


# -- media servers, INVITE --------------------------------------------------------------

def advertise(observer, expires_ms, *urls):
    observer.kz.publish('nodes', 'media', {
        'Event-Category': 'nodes', 'Event-Name': 'advertise', 'Node': 'freeswitch@media',
        'Expires': expires_ms, 'Media-Servers': {
            'media-%d' % i: {'Interfaces': {'sipinterface_1': {'info': {'url': url}}}}
            for i, url in enumerate(urls, 1)}}, confirm=True)


def destinations(node):
    return re.findall(r'URI: (\S+)', kamcmd(node, 'dispatcher.list'))


def test_media_servers_come_with_heartbeats_and_go_when_none_renews_them(node, observer):
    assert destinations(node) == []
    advertise(observer, 1500, 'sip:mod_sofia@127.0.0.1:5291', 'sip:mod_sofia@127.0.0.1:5292')
    assert wait_for(lambda: sorted(destinations(node)) == ['sip:127.0.0.1:5291',
                                                           'sip:127.0.0.1:5292'], 10)
    # Renewed (for longer): one stays, the other is not in the next heartbeat.
    advertise(observer, 4000, 'sip:mod_sofia@127.0.0.1:5291')
    assert wait_for(lambda: destinations(node) == ['sip:127.0.0.1:5291'], 10)
    assert 'media server sip:127.0.0.1:5292 expired: removed from set 1' in node.log()
    assert wait_for(lambda: destinations(node) == [], 10)
    assert 'media server sip:127.0.0.1:5291 expired: removed from set 1' in node.log()


def test_invite_without_a_media_server_is_480(node, observer):
    assert destinations(node) == []
    ok(scen.Sipp(scen.invite('480'), service='alice', user='alice',
                 password=USERS['alice']).wait())


def test_invite_is_authorized_by_kazoo_and_relayed_with_the_token(node, observer):
    advertise(observer, 60000, 'sip:mod_sofia@127.0.0.1:%d' % MEDIA_PORT)
    assert wait_for(lambda: destinations(node) == ['sip:127.0.0.1:%d' % MEDIA_PORT], 10)
    media = scen.Sipp(scen.media_server(486), port=MEDIA_PORT, server=True)
    try:
        before = len(observer.named('authn_req'))
        # The media server's 486 comes back through the node (not the query's 503).
        ok(scen.Sipp(scen.invite('486'), service='carol', user='carol',
                     password=USERS['carol']).wait())
        ok(media.wait())
    finally:
        media.stop()
    account, device = ids('carol')
    assert media.logs().splitlines() == ['X-AUTH-Token %s@%s' % (device, account)]
    [invite] = media.received('INVITE')
    assert 'Proxy-Authorization' not in invite   # consumed
    assert wait_for(lambda: len(observer.named('authn_req')) == before + 1, 10)
    [(key, req)] = observer.named('authn_req')[before:]
    assert key == 'authn.endpoint.req.%s' % REALM_KEY
    assert (req['Method'], req['Auth-User'], req['Auth-Realm']) == ('INVITE', 'carol', DOMAIN)
    assert req['To'] == 'sip:bob@%s' % DOMAIN


def test_invite_authn_err_is_forbidden(node):
    ok(scen.Sipp(scen.invite('403'), service='erin', user='erin', password='x').wait())


def test_invite_without_a_reply_in_time_is_503(node):
    result = scen.Sipp(scen.invite('503', domain=SILENT), service='carol', user='carol',
                       password=USERS['carol']).wait()
    ok(result)
    assert result.response_ms[0] >= 2000 * 0.95


# -- presence ----------------------------------------------------------------------------

def test_blf_subscribe_gets_notified_of_kazoos_dialog_updates(node):
    watcher = scen.Sipp(scen.subscribe('dialog', 'application/dialog-info+xml',
                                       '<state>confirmed</state>'), service='bob')
    try:
        assert watcher.wait_for(lambda w: w.received('NOTIFY'), 10), watcher.messages()
        [initial] = watcher.received('NOTIFY')
        assert 'Content-Type: application/dialog-info+xml' in initial
        assert 'entity="sip:bob@%s"' % DOMAIN in initial
        fake_kazoo('dialog', 'bob@%s' % DOMAIN, 'alice@%s' % DOMAIN, 'confirmed',
                   '--call-id', 'blf-call-1')
        ok(watcher.wait())
    finally:
        watcher.stop()
    notify = watcher.received('NOTIFY')[-1]
    assert 'Event: dialog' in notify
    assert 'Content-Type: application/dialog-info+xml' in notify
    assert 'entity="sip:bob@%s"' % DOMAIN in notify
    assert '<state>confirmed</state>' in notify and 'blf-call-1' in notify
    assert 'sip:alice@%s' % DOMAIN in notify


def test_mwi_subscribe_queries_kazoo_and_gets_notified_of_mwi_updates(node, observer):
    watcher = scen.Sipp(scen.subscribe('message-summary', 'application/simple-message-summary',
                                       r'Voice-Message: 2/1 \(0/0\)'), service='carol')
    try:
        assert watcher.wait_for(lambda w: w.received('NOTIFY'), 10), watcher.messages()
        assert wait_for(lambda: observer.named('mwi_query', Username='carol'), 10)
        [(key, query)] = observer.named('mwi_query', Username='carol')
        assert key == 'mwi_queries.%s' % REALM_KEY
        assert query['Event-Category'] == 'presence' and query['Realm'] == DOMAIN
        fake_kazoo('mwi', 'carol@%s' % DOMAIN, '2', '1')
        ok(watcher.wait())
    finally:
        watcher.stop()
    notify = watcher.received('NOTIFY')[-1]
    assert 'Event: message-summary' in notify
    assert 'Content-Type: application/simple-message-summary' in notify
    body = notify.split('\n\n', 1)[1]
    assert 'Messages-Waiting: yes' in body and 'Voice-Message: 2/1 (0/0)' in body
    assert 'Message-Account: sip:carol@%s' % DOMAIN in body


def test_a_presence_event_pua_json_would_drop_is_counted_not_fatal(node, observer):
    before = settled(node)
    observer.kz.publish('presence', 'dialog.%s.bob' % REALM_KEY, {
        'Event-Category': 'presence', 'Event-Name': 'dialog_update',
        'From': 'sip:bob@%s' % DOMAIN, 'To': 'sip:alice@%s' % DOMAIN, 'Call-ID': 'x'},
        confirm=True)   # no State
    assert wait_for(lambda: settled(node)['handler_errors'] == before['handler_errors'] + 1, 15)
    assert 'a dialog update needs State' in node.log()


def test_the_node_advertises_itself(node, observer):
    assert wait_for(lambda: observer.named('advertise', Node=node.node), 10)
    _, beat = observer.named('advertise', Node=node.node)[-1]
    assert beat['Event-Category'] == 'nodes' and beat['Expires'] == 3000
    assert set(beat['Roles']) >= {'Registrar', 'Presence'}


def test_kamailio_log_has_no_python_errors(node):
    log = node.log()
    assert 'Traceback' not in log and 'exception set' not in log, \
        log[log.find('Traceback') - 2000:][:6000]


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-v']))
