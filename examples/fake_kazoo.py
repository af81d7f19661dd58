"""A small Kazoo stand-in for trying examples/kazoo-node without a Kazoo cluster.

    python examples/fake_kazoo.py serve --user alice:secret@example.com \\
        --media sip:127.0.0.1:5090 --advertise 5
    python examples/fake_kazoo.py dialog alice@example.com bob@example.com confirmed
    python examples/fake_kazoo.py mwi alice@example.com 2 1
    python examples/fake_kazoo.py flush alice@example.com     # or: flush example.com

``serve`` answers ``directory``/``authn_req`` (exchange ``registrar``) from the users
given (``authn_resp`` with the clear-text ``Auth-Password`` and ``Custom-Channel-Vars``;
``authn_err`` for anybody else), advertises the media servers given on ``nodes`` every
``--advertise`` seconds (``Expires``: ``--expires`` ms), answers ``mwi_query`` with the
mailboxes given (``--mailbox alice@example.com=2/1``), leaves the authn_req of a
``--silent-realm`` unanswered, and prints every request it
answered. ``dialog``, ``mwi`` and ``flush`` publish one Kazoo event and exit.
Accounts and devices get ids made from their names (``ids()``), so tests know them.
Broker: ``--broker`` or KAZOO_GREEN_BROKERS, default the local RabbitMQ.
"""

import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kazoo_green  # noqa: E402,F401  (first: gevent's patching)
import gevent  # noqa: E402
from kazoo_green import Kazoo, encode  # noqa: E402

BROKER = os.environ.get('KAZOO_GREEN_BROKERS', 'amqp://guest:guest@127.0.0.1:5672//')


def ids(user, realm):
    """(Account-ID, Authorizing-ID) of ``user@realm``: Kazoo-like 32-hex ids."""
    return (hashlib.md5(realm.encode('utf-8')).hexdigest(),
            hashlib.md5(('%s@%s' % (user, realm)).encode('utf-8')).hexdigest())


def _aor(text):
    user, sep, realm = text.partition('@')
    if not (sep and user and realm):
        raise argparse.ArgumentTypeError('%r is not user@realm' % text)
    return user, realm


def _user(text):
    """user:password@realm"""
    credentials, sep, realm = text.rpartition('@')
    user, colon, password = credentials.partition(':')
    if not (sep and colon and user and realm):
        raise argparse.ArgumentTypeError('%r is not user:password@realm' % text)
    return (user, realm), password


def _mailbox(text):
    aor, sep, counts = text.partition('=')
    new, slash, saved = counts.partition('/')
    if not (sep and slash):
        raise argparse.ArgumentTypeError('%r is not user@realm=NEW/SAVED' % text)
    return _aor(aor), (int(new), int(saved))


def authn_reply(request, users, any_user=None):
    """The reply to an authn_req: authn_resp for a known user (or, with ``any_user``
    {realm: password}, anybody of those realms), else authn_err."""
    key = (request.get('Auth-User'), request.get('Auth-Realm'))
    if key not in users and key[1] in (any_user or {}) and key[0]:
        users = {key: any_user[key[1]]}
    if key not in users:
        return {'Event-Category': 'directory', 'Event-Name': 'authn_err'}
    account, device = ids(*key)
    return {'Event-Category': 'directory', 'Event-Name': 'authn_resp',
            'Auth-Password': users[key], 'Auth-Method': 'password',
            'Custom-Channel-Vars': {'Account-ID': account, 'Authorizing-ID': device,
                                    'Authorizing-Type': 'device', 'Username': key[0],
                                    'Realm': key[1]}}


def advertise_payload(node, media, expires_ms):
    return {'Event-Category': 'nodes', 'Event-Name': 'advertise', 'Node': node,
            'Expires': expires_ms, 'Roles': {'Media': {}},
            'Media-Servers': {'fake-media-%d' % i: {'Interfaces': {'sipinterface_1': {
                'info': {'url': url}}}} for i, url in enumerate(media, 1)}}


def mwi_payload(user, realm, new, saved, urgent=0, urgent_saved=0):
    return {'Event-Category': 'presence', 'Event-Name': 'mwi_update',
            'From': 'sip:%s@%s' % (user, realm), 'To': 'sip:%s@%s' % (user, realm),
            'From-User': user, 'From-Realm': realm, 'To-User': user, 'To-Realm': realm,
            'Messages-New': new, 'Messages-Saved': saved, 'Messages-Urgent': urgent,
            'Messages-Urgent-Saved': urgent_saved,
            'Messages-Waiting': 'yes' if new else 'no',
            'Message-Account': 'sip:%s@%s' % (user, realm), 'Expires': 3600}


def serve(args):
    users = dict(args.user)
    any_user = {realm: password for (_, realm), password in args.any_user}
    mailboxes = dict(args.mailbox)
    kz = Kazoo(args.broker, app_name='fake_kazoo', node=args.node)

    @kz.event_route('kazoo:consumer-event-directory-authn-req')
    def authn(request, meta):
        if request.get('Auth-Realm') in args.silent_realm:
            print('authn_req %s %s@%s -> no reply (silent realm)' % (
                request.get('Method'), request.get('Auth-User'), request.get('Auth-Realm')),
                flush=True)
            return
        if args.authn_delay:
            gevent.sleep(args.authn_delay)
        reply = authn_reply(request, users, any_user)
        kz.respond(request, reply, meta)
        if not args.quiet:
            print('authn_req %s %s@%s -> %s' % (request.get('Method'), request.get('Auth-User'),
                                            request.get('Auth-Realm'), reply['Event-Name']),
              flush=True)

    @kz.event_route('kazoo:consumer-event-presence-mwi-query')
    def mwi_query(request, meta):
        key = (request.get('Username'), request.get('Realm'))
        print('mwi_query %s@%s' % key, flush=True)
        if key in mailboxes:
            new, saved = mailboxes[key]
            kz.publish('presence', 'mwi_updates.%s.%s' % (encode(key[1]), encode(key[0])),
                       mwi_payload(key[0], key[1], new, saved))

    kz.subscribe('registrar', 'authn.endpoint.req.*', exchange_type='topic',
                 queue='fake-kazoo-authn', auto_delete=True)
    kz.subscribe('presence', 'mwi_queries.*', exchange_type='topic',
                 queue='fake-kazoo-mwi-queries', auto_delete=True)
    kz.subscribe('nodes', 'fake-kazoo', exchange_type='fanout')

    def advertise():
        while True:
            kz.publish('nodes', kz.node, advertise_payload(kz.node, args.media, args.expires))
            gevent.sleep(args.advertise)

    kz.start()
    if not kz.wait_connected(30):
        sys.exit('fake_kazoo: no broker at %s' % args.broker)
    print('fake_kazoo: serving %d users, %d media servers' % (len(users), len(args.media)),
          flush=True)
    if args.media:
        gevent.spawn(advertise)
    kz.run()


def publish_one(args, exchange, key, payload):
    kz = Kazoo(args.broker, app_name='fake_kazoo')
    kz.publish(exchange, key, payload, confirm=True)
    kz.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--broker', default=BROKER)
    sub = parser.add_subparsers(dest='command', required=True)
    s = sub.add_parser('serve', help='answer authn_req, advertise media servers')
    s.add_argument('--user', type=_user, action='append', default=[],
                   help='user:password@realm (repeatable)')
    s.add_argument('--any-user', type=lambda t: _user('*:' + t), action='append', default=[],
                   help='password@realm: every user of realm has this password (benchmarks)')
    s.add_argument('--media', action='append', default=[], help='a media server SIP URI')
    s.add_argument('--advertise', type=float, default=5.0, help='seconds between heartbeats')
    s.add_argument('--expires', type=int, default=15000, help='heartbeat Expires, ms')
    s.add_argument('--mailbox', type=_mailbox, action='append', default=[],
                   help='user@realm=NEW/SAVED, the answer to its mwi_query')
    s.add_argument('--authn-delay', type=float, default=0.0,
                   help='seconds before answering each authn_req')
    s.add_argument('--silent-realm', action='append', default=[],
                   help='a realm whose authn_req get no reply (repeatable)')
    s.add_argument('--quiet', action='store_true', help='print no line per request')
    s.add_argument('--node', default=None)
    d = sub.add_parser('dialog', help='publish a presence dialog_update')
    d.add_argument('presentity', type=_aor)
    d.add_argument('peer', type=_aor)
    d.add_argument('state', choices=['early', 'confirmed', 'terminated'])
    d.add_argument('--call-id', default=None)
    d.add_argument('--direction', default='initiator', choices=['initiator', 'recipient'])
    m = sub.add_parser('mwi', help='publish a presence mwi_update')
    m.add_argument('mailbox', type=_aor)
    m.add_argument('new', type=int)
    m.add_argument('saved', type=int)
    m.add_argument('--urgent', type=int, default=0)
    m.add_argument('--urgent-saved', type=int, default=0)
    f = sub.add_parser('flush', help='publish a directory reg_flush')
    f.add_argument('aor', help='user@realm, or a realm: all its users')
    f.add_argument('--cache-only', action='store_true')
    args = parser.parse_args(argv)
    if args.command == 'serve':
        return serve(args)
    if args.command == 'dialog':
        (user, realm), (peer, peer_realm) = args.presentity, args.peer
        publish_one(args, 'presence', 'dialog.%s.%s' % (encode(realm), encode(user)), {
            'Event-Category': 'presence', 'Event-Name': 'dialog_update',
            'From': 'sip:%s@%s' % (user, realm), 'From-User': user, 'From-Realm': realm,
            'To': 'sip:%s@%s' % (peer, peer_realm), 'To-User': peer, 'To-Realm': peer_realm,
            'State': args.state, 'Direction': args.direction,
            'Call-ID': args.call_id or 'fake-kazoo-%s-%s' % (user, peer), 'Expires': 3600})
    elif args.command == 'mwi':
        user, realm = args.mailbox
        publish_one(args, 'presence', 'mwi_updates.%s.%s' % (encode(realm), encode(user)),
                    mwi_payload(user, realm, args.new, args.saved, args.urgent,
                                args.urgent_saved))
    elif args.command == 'flush':
        user, _, realm = args.aor.rpartition('@')
        payload = {'Event-Category': 'directory', 'Event-Name': 'reg_flush', 'Realm': realm}
        if user:
            payload['Username'] = user
        if args.cache_only:
            payload['Cache-Only'] = 'true'
        publish_one(args, 'registrar', 'registration.flush.%s' % encode(realm), payload)
    return 0


if __name__ == '__main__':
    sys.exit(main())
