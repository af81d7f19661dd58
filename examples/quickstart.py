"""kazoo_green in one file: publish, subscribe with an event route, query a responder.

Runs with no broker (kombu's memory://); pass an AMQP URL to use RabbitMQ:

    python examples/quickstart.py [amqp://guest:guest@127.0.0.1:5672//]
"""

import sys

import kazoo_green  # first: it applies gevent's monkey patching before kombu loads
from kazoo_green import Kazoo, QueryTimeout

from gevent.event import Event

broker = sys.argv[1] if len(sys.argv) > 1 else 'memory://'

# A responder (usually another application): answers route.req queries.
responder = Kazoo(broker, app_name='quickstart-responder')


@responder.event_route('kazoo:consumer-event-route-req')
def answer(request, meta):
    responder.respond(request, {'Route': 'sip:%s@127.0.0.1:5090' % request['To']}, meta)


responder.subscribe('quickstart-callmgr', 'route.req', exchange_type='topic')
responder.start()

# The application.
kz = Kazoo(broker, app_name='quickstart')
done = Event()


@kz.event_route('kazoo:consumer-event-presence-update')
def presence(payload, meta):
    print('presence: %s is %s (routing key %s)' % (payload['From'], payload['State'],
                                                   meta.routing_key))
    done.set()


kz.subscribe('quickstart-presence', 'update.*', exchange_type='topic', ack='late')
kz.start()
kz.wait_connected()
responder.wait_connected()

kz.publish('quickstart-presence', 'update.alice', {
    'Event-Category': 'presence', 'Event-Name': 'update', 'From': 'alice', 'State': 'busy'})
done.wait(5)

try:
    reply = kz.query('quickstart-callmgr', 'route.req',
                     {'Event-Category': 'route', 'Event-Name': 'req', 'To': 'bob'}, timeout=2)
    print('route for bob:', reply['Route'])
except QueryTimeout:
    print('no reply in time')

print('json_path:', kazoo_green.json_path({'Channels': [{'switch_url': 'sip:fs1'}]},
                                         'Channels[0].switch_url'))
print('encode:', kazoo_green.encode('alice@example.com'))
kz.stop()
responder.stop()
