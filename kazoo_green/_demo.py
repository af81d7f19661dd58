"""``kazoo-green demo``: publish, query an in-process responder, fire event routes."""

import sys
from time import monotonic

import kazoo_green
from kazoo_green import Kazoo, KazooError, encode

__all__ = ['demo']


def _say(kind, text):
    print('%-9s %s' % ('[%s]' % kind, text))
    sys.stdout.flush()


def demo(broker='memory://', prefix='demo'):
    """Publish, query an in-process responder, and fire event routes with both ack modes."""
    import gevent
    ex_callmgr, ex_presence, ex_registrar = (prefix + '-callmgr', prefix + '-presence',
                                             prefix + '-registrar')
    _say('demo', 'kazoo_green %s on %s' % (kazoo_green.__version__, broker))

    # A responder, as another application would run it.
    responder = Kazoo(broker, app_name='demo-responder', workers=2)

    @responder.event_route('kazoo:consumer-event-route-req')
    def route_req(request, meta):
        user = request.get('To', '')
        reply = {'Event-Category': 'route', 'Event-Name': 'resp'}
        if not user.startswith('unknown'):
            reply['Route'] = 'sip:%s@127.0.0.1:5090' % user
        responder.respond(request, reply, meta)

    responder.subscribe(ex_callmgr, 'route.req', exchange_type='topic',
                        queue=prefix + '-route-req')
    responder.start()

    # The application: event routes, chosen from the payload.
    app = Kazoo(broker, app_name='demo-app', workers=4)
    handled = []

    @app.event_route('kazoo:consumer-event-connection-open')
    def connection_open(payload, meta):
        _say('event', '%s: %s link up to %s' % (meta.route, payload['Link'], payload['Host']))

    @app.event_route('kazoo:consumer-event-presence-update')
    def presence_update(payload, meta):
        if payload.get('State') == 'broken':
            handled.append(meta.route)
            raise ValueError('this handler fails on purpose: late ack rejects the message')
        _say('event', '%s (late ack): %s is %s' % (meta.route, payload['From'],
                                                  payload['State']))
        handled.append(meta.route)

    @app.event_route('kazoo:consumer-event-directory')
    def directory(payload, meta):
        _say('event', '%s (early ack, category fallback for %s): %s@%s'
             % (meta.route, payload['Event-Name'], payload['Username'], payload['Realm']))
        handled.append(meta.route)

    app.subscribe(ex_presence, 'update.*.*', exchange_type='topic', ack='late',
                  queue=prefix + '-presence-late')
    app.subscribe(ex_registrar, 'registration.#', exchange_type='topic', ack='early',
                  queue=prefix + '-registrar-early')
    app.start()
    if not (responder.wait_connected(10) and app.wait_connected(10)):
        _say('error', 'could not connect to %s' % broker)
        return 1
    gevent.sleep(0.05)

    realm, user = 'example.com', 'alice smith'
    key = 'registration.success.%s.%s' % (encode(realm), encode(user))
    msg_id = app.publish(ex_registrar, key, {
        'Event-Category': 'directory', 'Event-Name': 'reg_success', 'Username': user,
        'Realm': realm, 'Contact': '<sip:alice@127.0.0.1:5070>', 'Call-ID': 'demo-1'})
    _say('publish', '%s %s Msg-ID %s' % (ex_registrar, key, msg_id))

    for to in ('alice', 'unknown-bob'):
        started = monotonic()
        reply = app.query(ex_callmgr, 'route.req', {
            'Event-Category': 'route', 'Event-Name': 'req', 'To': to, 'From': 'carol',
            'Call-ID': 'demo-%s' % to})
        _say('query', 'route.req To=%s -> Route=%s (%.1f ms)'
             % (to, reply.get('Route', '(none)'), (monotonic() - started) * 1000))

    for who, state in (('alice', 'busy'), ('bob', 'idle'), ('carol', 'broken')):
        app.publish(ex_presence, 'update.%s.example%%2Ecom' % who, {
            'Event-Category': 'presence', 'Event-Name': 'update', 'From': who,
            'State': state})
    try:
        app.publish('no-such-exchange', 'x', {'Event-Category': 'x', 'Event-Name': 'y'})
    except KazooError as exc:
        _say('error', 'expected: %s' % exc)

    deadline = monotonic() + 5
    while len(handled) < 4 and monotonic() < deadline:
        gevent.sleep(0.01)
    gevent.sleep(0.05)
    app.stop()
    responder.stop()
    stats = app.stats()
    _say('stats', ' '.join('%s=%s' % (k, stats[k]) for k in (
        'published', 'queries_ok', 'consumed', 'acked', 'rejected', 'handler_errors',
        'publish_errors')))
    ok = len(handled) >= 4 and stats['queries_ok'] == 2 and stats['rejected'] == 1
    _say('demo', 'done' if ok else 'FAILED')
    return 0 if ok else 1
