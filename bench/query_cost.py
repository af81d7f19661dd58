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

``--tls``: both over plain TCP and over TLS to one broker node (the TLS node of
tests/tls.py, booted here, through its plain and its TLS listener), all four alternating
query by query; ``bare`` over TLS sends and receives through the SSL socket.

Then the pieces of a query, each timed alone, warm and cold (16 MB touched before each
call, which evicts the caches as the other processes do between a worker's calls):
envelope stamping, JSON encoding (kazoo_green's ``dumps``: orjson, against simplejson's
encoder it used before), frame building (generic, and a query's request), reply
decoding, the two gevent locks and the event a blocking query used before it took the
lock-free lane, what a SIP worker adds for Kamailio's statistics (its counters stored in
its shared-memory slot, a histogram observation into the slot), and a call doing nothing.

Last, the Python bytecodes one query executes, per function (``sys.settrace`` with
opcode events): a count that does not depend on the machine's noise. With cold caches a
query's cost follows the code and data it touches, so fewer bytecodes and fewer
functions mean less CPU.

    .venv/bin/python bench/query_cost.py [--queries 2000] [--pause 0.004] [--pieces 1000]
        [--tls]
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault('KAZOO_GREEN_NO_PATCH', '1')  # time.sleep must really sleep
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kazoo_green import Kazoo  # noqa: E402
from kazoo_green._amqpfast import encode_publish, encode_request, _poll  # noqa: E402
from kazoo_green.wire import dumps, loads_payload  # noqa: E402
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
    parser.add_argument('--pieces', type=int, default=1000,
                        help='calls per piece in the warm/cold table (0: skip it)')
    parser.add_argument('--tls', action='store_true',
                        help='plain TCP and TLS side by side, to the TLS node of tests/tls.py')
    args = parser.parse_args()

    node = None
    if args.tls:
        from tests.tls import start_tls_broker
        node = start_tls_broker()
        transports = [('tcp', node.amqp_url, None), ('tls', node.amqps_url, {'ca_certs': node.ca})]
        responder = harness.Responder(os.path.join(tempfile.mkdtemp(prefix='kg-cost-'),
                                                   'responder.log'),
                                      env={'KAZOO_GREEN_BROKERS': node.amqp_url},
                                      queues=harness.node_queues(node.node))
    else:
        transports = [('tcp', None, None)]
        responder = harness.Responder(os.path.join(tempfile.mkdtemp(prefix='kg-cost-'),
                                                   'responder.log'))
    responder.start()
    runtimes = []
    try:
        calls = {}
        for name, url, ssl in transports:
            kz = Kazoo(url, app_name='kamailio', node='kamailio@kg-query-cost-%s' % name,
                       blocking=True, ssl=ssl)
            runtimes.append(kz)
            kz.query('callmgr', 'route.req', request(0))  # connected, reply queue ready
            suffix = '' if len(transports) == 1 else ' ' + name
            calls['bare' + suffix] = bare_query(kz)
            calls['kazoo_green' + suffix] = kazoo_green_query(kz)
        for pause in (0.0, args.pause):
            spent = dict((name, 0.0) for name in calls)
            for i in range(args.queries):
                for name, fn in calls.items():
                    started = time.thread_time()
                    fn(i)
                    spent[name] += time.thread_time() - started
                    if pause:
                        time.sleep(pause)
            per = dict((k, v / args.queries * 1e6) for k, v in spent.items())
            label = 'paused %.0f ms' % (pause * 1e3) if pause else 'back to back'
            for name, _, _ in transports:
                suffix = '' if len(transports) == 1 else ' ' + name
                print('%-13s%s bare %6.1f µs/query   kazoo_green %6.1f µs/query   '
                      'difference %6.1f µs' % (label, (' %-4s' % name) if suffix else '',
                                               per['bare' + suffix],
                                               per['kazoo_green' + suffix],
                                               per['kazoo_green' + suffix]
                                               - per['bare' + suffix]))
            sys.stdout.flush()
        if args.pieces:
            pieces(runtimes[0], args.pieces)
        bytecodes(dict((name, (lambda fn: lambda: fn(10 ** 6))(fn)) for name, fn in calls.items()))
    finally:
        for kz in runtimes:
            kz.stop()
        responder.stop()
        if node is not None:
            node.node.stop()


def bare_query(kz):
    """The least a query can cost: its frames in one send, then poll + recv until the
    reply's last frame (through the SSL socket on a TLS connection)."""
    link = kz._pub_link
    sock = link.fast.sock
    tls = link.fast.tls
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
            if not (tls and sock.pending()):
                poller.poll(-1)
            if sock.recv(65536).endswith(b'}\xce'):  # a JSON body's last frame
                return
    return bare


def kazoo_green_query(kz):
    def kazoo_green(i):
        assert kz.query('callmgr', 'route.req', request(i))['Route']
    return kazoo_green


def pieces(kz, calls):
    """CPU per call of each piece of a query, warm and with evicted caches."""
    import simplejson
    message = kz._message(request(1))
    message['Server-ID'] = kz.server_id
    body = dumps(message)
    reply = dumps({'Msg-ID': message['Msg-ID'], 'Route': 'sip:user1@127.0.0.1:5090',
                   'Event-Category': 'route', 'Event-Name': 'resp', 'App-Name': 'responder',
                   'App-Version': '1', 'Node': 'responder@host'})
    simplejson_dumps = simplejson.JSONEncoder(separators=(',', ':'), ensure_ascii=False).encode
    props = {'content_type': 'application/json', 'content_encoding': 'utf-8',
             'correlation_id': message['Msg-ID'], 'reply_to': 'amq.rabbitmq.reply-to'}
    frame_max = kz._pub_link.fast.frame_max
    from gevent.event import Event
    from gevent.lock import RLock
    wlock, rlock, read_free = RLock(), RLock(), Event()
    # What a SIP worker adds for Kamailio's statistics (kazoo_green._kamstats): its
    # counters stored in its slot after each call, a histogram observed into the slot.
    from kazoo_green._kamstats import KamailioStats
    stats = KamailioStats(kz)
    stats.claim()
    kz._stats.new_histogram = stats._histogram

    def locks():   # what a blocking query took and released before the lane (df874ca)
        wlock.acquire(blocking=False)
        rlock.acquire(blocking=False)
        read_free.clear()
        rlock.release()
        read_free.set()
        wlock.release()

    cases = (
        ('stamp envelope', lambda: kz._message(request(2))),
        ('dumps (orjson)', lambda: dumps(message)),
        ('dumps (simplejson)', lambda: simplejson_dumps(message).encode('utf-8')),
        ('encode_publish', lambda: encode_publish(1, 'callmgr', 'route.req', body, props,
                                                  None, True, frame_max)),
        ('encode_request', lambda: encode_request(1, 'callmgr', 'route.req', body,
                                                  message['Msg-ID'], 'amq.rabbitmq.reply-to',
                                                  None, True, frame_max)),
        ('loads_payload', lambda: loads_payload(reply)),
        ('2 RLocks + Event', locks),
        ('stats: counters', stats.write),
        ('stats: histogram', lambda: kz._stats.observe('query_seconds', 'in-slot', 0.0012)),
        ('nothing', lambda: None),
    )
    junk = bytearray(16 * 1024 * 1024)
    zeros = bytes(len(junk) // 64)

    def evict():
        junk[::64] = zeros   # one write per cache line of 16 MB

    print('\n%-20s %8s %8s   (µs CPU per call)' % ('piece', 'warm', 'cold'))
    for name, fn in cases:
        spent = []
        for cold in (False, True):
            total = 0.0
            for _ in range(calls):
                if cold:
                    evict()
                started = time.thread_time()
                fn()
                total += time.thread_time() - started
            spent.append(total / calls * 1e6)
        print('%-20s %8.1f %8.1f' % (name, spent[0], spent[1]))
    kz._stats.new_histogram = None


def bytecodes(calls):
    """Bytecodes executed by one call of each of ``calls``, in all and per function."""
    import collections
    from bytecode_count import opcode_tracer   # bench/, this script's directory
    for name, fn in calls.items():
        fn()   # warm: adaptive bytecode settled, connections made
        counts = collections.Counter()
        sys.settrace(opcode_tracer(counts))
        try:
            fn()
        finally:
            sys.settrace(None)
        top = ', '.join('%s %d' % item for item in counts.most_common(8))
        print('\nbytecodes per query, %s: %d in %d functions (%s%s)'
              % (name, sum(counts.values()), len(counts), top,
                 ', ...' if len(counts) > 8 else ''))


if __name__ == '__main__':
    main()
