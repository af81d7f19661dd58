"""bench/compare.py's "py-bound": the least Python a sync query in a SIP worker can run.

The same INVITE handling as examples/kamailio/router.py's sync path, but the query is
hand-written: kazoo_green only opens the connection (and serves the first query); every
later one is the request's frames built with ``encode_publish`` and written with one
``send``, then ``poll`` + ``recv`` until the reply's last frame is in, its JSON cut out
and read with orjson. No error handling, no timeout, no Msg-ID check, no counters: a
lower bound for what kazoo_green's ``query`` costs in a SIP worker, not something to
deploy.
"""

import os

import venv_path  # noqa: F401  (the venv on sys.path: first)

import orjson  # noqa: E402

import kazoo_green  # noqa: E402,F401
from kazoo_green import KazooError, Kazoo  # noqa: E402
from kazoo_green._amqpfast import _poll, encode_publish  # noqa: E402
from kazoo_green.wire import new_msg_id  # noqa: E402

import KSR  # noqa: E402

from floor import Floor  # noqa: E402

kz = Kazoo(app_name='kamailio', node='kamailio@kg-bound', blocking=True)
_socket = {}   # pid -> (send, recv, poll, channel id, Server-ID, frame_max)


def query(payload):
    link = kz._pub_link
    state = _socket.get(os.getpid())
    if state is None:
        reply = kz.query('callmgr', 'route.req', payload)   # connects
        fast = link.fast
        poller = _poll()   # the real poll(2), not gevent's
        poller.register(fast._fileno, 1)
        _socket[os.getpid()] = (fast._send, fast._recv, poller.poll,
                                kz._publisher.channel.channel_id, kz.server_id, fast.frame_max)
        return reply
    send, recv, poll, channel, server_id, frame_max = state
    msg_id = new_msg_id()
    payload.update({'App-Name': 'kamailio', 'App-Version': '1', 'Node': kz.node,
                    'Msg-ID': msg_id, 'Server-ID': server_id})
    send(encode_publish(channel, 'callmgr', 'route.req', orjson.dumps(payload),
                        {'content_type': 'application/json', 'correlation_id': msg_id,
                         'reply_to': 'amq.rabbitmq.reply-to'}, None, True, frame_max))
    data = b''
    while not data.endswith(b'}\xce'):   # a JSON body frame's end
        poll(2000)
        data += recv(65536)
    return orjson.loads(data[data.rindex(b'\xce\x03') + 8:-1])   # the body frame's payload


class Bound(Floor):
    """floor.py's transaction handling; the INVITE answered from the query's reply."""

    def child_init(self, rank):
        import gevent
        gevent.reinit()
        return 0

    def invite(self):
        payload = {'Event-Category': 'route', 'Event-Name': 'req',
                   'To': KSR.pv.get('$rU') or '', 'From': KSR.pv.get('$fU'),
                   'Call-ID': KSR.pv.get('$ci')}
        try:
            reply = query(payload)
        except KazooError:
            KSR.tm.t_reply(503, 'Service Unavailable')
            return
        route = reply.get('Route')
        if route:
            KSR.pv.sets('$ru', str(route))
            KSR.tm.t_reply(302, 'Moved Temporarily')
        else:
            KSR.tm.t_reply(404, 'Not Found')


def mod_init():
    return Bound()
