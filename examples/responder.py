"""A standalone kazoo_green responder for ``route.req`` queries (used by the Kamailio example).

Answers on exchange ``callmgr`` (topic), routing key ``route.req``:

* ``To`` starting with ``unknown``: a reply without ``Route`` (Kamailio answers 404);
* ``To`` starting with ``slow`` or ``asynclate``: the reply comes after 5 s (past the query
  timeout: 503);
* anyone else: ``Route: sip:<To>@127.0.0.1:5090`` (302 with that Contact).

Brokers come from ``KAZOO_GREEN_BROKERS`` (``;``-separated, ``zone=NAME;`` before a
zone's URLs as in the C module's ``amqp_connection``; ``KAZOO_GREEN_ZONE`` names the primary
one; ``KAZOO_GREEN_SHAPE=standalone`` for independent brokers), default the local
RabbitMQ; TLS options from ``KAZOO_GREEN_AMQPS_*`` (``kazoo_green.ssl_from_env``).
Stops on SIGTERM/SIGINT.

    python examples/responder.py
"""

import logging
import os

import kazoo_green  # noqa: F401  (patches gevent before kombu loads)
from kazoo_green import Kazoo

import gevent

SLOW_SECONDS = 5.0

kz = Kazoo(os.environ.get('KAZOO_GREEN_BROKERS', 'amqp://guest:guest@127.0.0.1:5672//'),
           app_name='responder', workers=16, ssl=kazoo_green.ssl_from_env(),
           zone=os.environ.get('KAZOO_GREEN_ZONE') or None,
           shape=os.environ.get('KAZOO_GREEN_SHAPE') or 'cluster')


@kz.event_route('kazoo:consumer-event-route-req')
def route_req(request, meta):
    user = str(request.get('To') or '')
    reply = {'Event-Category': 'route', 'Event-Name': 'resp'}
    if user.startswith('unknown'):
        kz.respond(request, reply, meta)
    elif user.startswith(('slow', 'asynclate')):
        gevent.spawn_later(SLOW_SECONDS, _late_reply, request, meta,
                           dict(reply, Route='sip:%s@127.0.0.1:5090' % user))
    else:
        reply['Route'] = 'sip:%s@127.0.0.1:5090' % user
        kz.respond(request, reply, meta)


def _late_reply(request, meta, reply):
    try:
        kz.respond(request, reply, meta)
    except kazoo_green.KazooError as exc:  # the broker may be gone by then
        logging.getLogger('responder').warning('late reply not sent: %s', exc)


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
    # auto_delete: when the last responder goes away, so does the queue, and requesters
    # (which publish queries as mandatory) get an immediate "unroutable" instead of
    # waiting for their timeout.
    kz.subscribe('callmgr', 'route.req', exchange_type='topic', queue='responder-route-req',
                 auto_delete=True, ack='early', prefetch=256)
    kz.run()
