"""CPU per query in one process: kazoo_green's blocking query against a bare socket loop.

What a Kamailio SIP worker pays for one sync query, without Kamailio: the calling
thread's CPU time (user+system, ``time.thread_time``) per query for

* ``bare``: the same request frames written with one ``send``, then ``poll`` + ``recv``
  until the reply is in: only the kernel's part of an AMQP round trip;
* ``kazoo_green``: ``Kazoo(blocking=True).query(...)`` as the example router calls it;

back to back, and paced with a pause between queries (a SIP worker at 250 calls/s
sleeps ~4 ms between calls, so every call starts with cold caches). The two alternate
query by query, so both see the same machine. Needs the local RabbitMQ; starts
examples/responder.py.

    .venv/bin/python bench/query_cost.py [--queries 2000] [--pause 0.004]
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault('KAZOO_GREEN_NO_PATCH', '1')  # time.sleep must really sleep
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kazoo_green import Kazoo  # noqa: E402
from kazoo_green._amqpfast import encode_publish, _poll  # noqa: E402
from kazoo_green.wire import dumps  # noqa: E402
from tests.e2e import harness  # noqa: E402

_POLLIN = 1


def request(i):
    return {'Event-Category': 'route', 'Event-Name': 'req', 'To': 'user%d' % i,
            'From': 'caller', 'Call-ID': 'call-%d@bench' % i}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--queries', type=int, default=2000)
    parser.add_argument('--pause', type=float, default=0.004,
                        help='seconds between queries in the paced rounds')
    args = parser.parse_args()

    responder = harness.Responder(os.path.join(tempfile.mkdtemp(prefix='kg-cost-'),
                                               'responder.log'))
    responder.start()
    kz = Kazoo(app_name='kamailio', node='kamailio@kg-query-cost', blocking=True)
    try:
        kz.query('callmgr', 'route.req', request(0))  # connected, reply queue ready
        link = kz._pub_link
        sock = getattr(link.fast.sock, '_sock', link.fast.sock)
        poller = _poll()
        poller.register(sock.fileno(), _POLLIN)
        channel_id = kz._publisher.channel.channel_id
        server_id = kz._replies.server_id

        def bare(i):
            msg_id = 'bare-%d' % i
            body = dumps(dict(request(i), **{'Msg-ID': msg_id, 'Server-ID': server_id}))
            sock.send(encode_publish(channel_id, 'callmgr', 'route.req', body, {
                'content_type': 'application/json', 'correlation_id': msg_id,
                'reply_to': 'amq.rabbitmq.reply-to'}, None, True, link.fast.frame_max))
            while True:
                poller.poll(-1)
                if sock.recv(65536).endswith(b'}\xce'):  # a JSON body's last frame
                    return

        def kazoo_green(i):
            assert kz.query('callmgr', 'route.req', request(i))['Route']

        for pause in (0.0, args.pause):
            spent = {'bare': 0.0, 'kazoo_green': 0.0}
            for i in range(args.queries):
                for name, fn in (('bare', bare), ('kazoo_green', kazoo_green)):
                    started = time.thread_time()
                    fn(i)
                    spent[name] += time.thread_time() - started
                    if pause:
                        time.sleep(pause)
            per = dict((k, v / args.queries * 1e6) for k, v in spent.items())
            print('%-13s bare %6.1f µs/query   kazoo_green %6.1f µs/query   '
                  'difference %6.1f µs' % ('paused %.0f ms' % (pause * 1e3) if pause
                                           else 'back to back', per['bare'],
                                           per['kazoo_green'],
                                           per['kazoo_green'] - per['bare']))
            sys.stdout.flush()
    finally:
        kz.stop()
        responder.stop()


if __name__ == '__main__':
    main()
