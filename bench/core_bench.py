#!/usr/bin/env python3
"""Core benchmark: kazoo_green against plain kombu doing the same work, in one run.

Runs against a local RabbitMQ (loopback only) and prints a Markdown table:

1. publish            fire-and-forget ~300-byte JSON messages to a topic exchange, msg/s
2. sequential query   p50 / p99 latency (ms) and calls/s, one query after another;
                      kazoo_green both caller-driven (no start()) and with start()
3. concurrent query   50 greenlets querying at once on ONE runtime, total calls/s
4. event dispatch     a pre-loaded queue consumed with late acks, msg/s until all acked

The plain kombu side is the reference floor: what a typical kombu user would
write for the same job (RabbitMQ direct reply-to for queries, Producer.publish
with serializer='json', a Consumer with on_message and message.ack()).

Both sides query the SAME responder: ``--responders`` separate processes
(``python bench/core_bench.py --responder``) written with plain py-amqp and no
gevent. A responder answers to ``reply_to`` (direct reply-to) when the request
has one, else Kazoo style: exchange ``targeted``, routing key ``Server-ID``,
with ``Msg-ID`` copied into the reply.

This is a measurement script, not a test: it never asserts timings. Wall time
on a small machine is noisy (broker, responder and benchmark share the
cores), so CPU time of the benchmarking process per operation is printed too,
with the CPU other processes of the machine used meanwhile ("foreign").
Each line runs in alternating rounds (plain, kazoo_green, kazoo_green, plain,
...) and the median round is shown. A round that fails (e.g. the broker was
restarted under it) is retried after the broker is back, and noted.

Usage::

    .venv/bin/python bench/core_bench.py            # full run (about a minute)
    .venv/bin/python bench/core_bench.py --quick    # about 20 s
    .venv/bin/python bench/core_bench.py --json bench/results/run.json

Every exchange and queue it makes is named ``bench-*`` and deleted at the end
(the ``targeted`` exchange too when it did not exist before, and only while
nothing is bound to it).
"""

import os
import sys

RESPONDER_FLAG = '--responder'

# Names (everything this script creates starts with ``bench-``).
EX_CALLMGR = 'bench-callmgr'
RK_REQUEST = 'route.req'
Q_REQUESTS = 'bench-route-req'
EX_PUBLISH = 'bench-publish'
Q_PUBLISH = 'bench-publish-q'
EX_EVENTS = 'bench-events'
Q_EVENTS = 'bench-events-q'
RK_EVENTS = 'ev.bench'
TARGETED = 'targeted'
DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to'
DEFAULT_URL = 'amqp://guest:guest@127.0.0.1:5672//'


# ---------------------------------------------------------------------------
# The responder: a separate process, plain py-amqp, no gevent, no kazoo_green.
# ---------------------------------------------------------------------------
def run_responder(argv):
    import argparse
    import json
    import signal
    import socket
    import time

    import amqp
    from kombu.utils.url import parse_url

    parser = argparse.ArgumentParser(prog='core_bench.py --responder')
    parser.add_argument(RESPONDER_FLAG, action='store_true')
    parser.add_argument('--url', default=DEFAULT_URL)
    parser.add_argument('--prefetch', type=int, default=1000)
    args, _ = parser.parse_known_args(argv)

    parent = os.getppid()
    u = parse_url(args.url)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(True))
    signal.signal(signal.SIGINT, lambda *a: stop.append(True))
    loads, dumps = json.loads, json.dumps
    Message = amqp.Message
    handled = [0]
    ready = False
    down = False

    def serve():
        nonlocal ready, down
        conn = amqp.Connection(
            host='%s:%s' % (u.get('hostname') or '127.0.0.1', u.get('port') or 5672),
            userid=u.get('userid') or 'guest', password=u.get('password') or 'guest',
            virtual_host=u.get('virtual_host') or '/', connect_timeout=2)
        conn.connect()
        try:
            ch = conn.channel()
            # Idempotent (same arguments as the parent), so a restarted broker
            # gets its request queue back.
            ch.exchange_declare(EX_CALLMGR, 'topic', durable=False, auto_delete=False)
            ch.queue_declare(Q_REQUESTS, durable=False, exclusive=False, auto_delete=False)
            ch.queue_bind(Q_REQUESTS, EX_CALLMGR, RK_REQUEST)
            # With no_ack the prefetch limit does not apply; set anyway.
            ch.basic_qos(0, args.prefetch, False)
            publish = ch.basic_publish

            def on_request(msg):
                req = loads(msg.body)
                reply = {'Event-Category': 'route', 'Event-Name': 'resp',
                         'Route': 'sip:%s@127.0.0.1:5090' % req.get('To', 'x'),
                         'Msg-ID': req.get('Msg-ID')}
                body = dumps(reply, separators=(',', ':'))
                props = msg.properties
                reply_to = props.get('reply_to')
                if reply_to:
                    publish(Message(body, content_type='application/json',
                                    correlation_id=props.get('correlation_id')),
                            exchange='', routing_key=reply_to)
                elif req.get('Server-ID'):
                    publish(Message(body, content_type='application/json'),
                            exchange=TARGETED, routing_key=req['Server-ID'])
                handled[0] += 1

            ch.basic_consume(queue=Q_REQUESTS, no_ack=True, callback=on_request)
            if down:
                sys.stderr.write('responder %d: consuming again\n' % os.getpid())
                down = False
            if not ready:
                ready = True
                sys.stdout.write('ready\n')
                sys.stdout.flush()
            while not stop and os.getppid() == parent:
                try:
                    conn.drain_events(timeout=0.2)
                except socket.timeout:
                    pass
        finally:
            try:
                conn.close()
            except Exception:
                pass

    while not stop and os.getppid() == parent:
        try:
            serve()
        except Exception as exc:  # the broker went away: come back when it does
            if not down:  # once per outage
                sys.stderr.write('responder %d: %s: %s; reconnecting\n'
                                 % (os.getpid(), type(exc).__name__, str(exc)[:200]))
            down = True
            time.sleep(0.5)
    sys.stdout.write('handled %d\n' % handled[0])
    sys.stdout.flush()
    return 0


if __name__ == '__main__' and RESPONDER_FLAG in sys.argv[1:]:
    sys.exit(run_responder(sys.argv[1:]))


# ---------------------------------------------------------------------------
# The benchmark process. kazoo_green first: importing it monkey-patches gevent,
# which must happen before kombu is imported (the plain side relies on it too).
# ---------------------------------------------------------------------------
import kazoo_green  # noqa: E402  (must come before kombu)
from kazoo_green import Kazoo  # noqa: E402

from gevent import monkey  # noqa: E402

if not monkey.is_module_patched('socket'):
    sys.exit('core_bench: gevent has not patched the standard library '
             '(KAZOO_GREEN_NO_PATCH set?); unset it and run again')

import argparse  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import traceback  # noqa: E402
import uuid  # noqa: E402
from time import perf_counter  # noqa: E402

import gevent  # noqa: E402
from gevent.event import AsyncResult  # noqa: E402
from gevent.lock import Semaphore  # noqa: E402

import amqp  # noqa: E402
import kombu  # noqa: E402
from kombu import Connection, Consumer, Exchange, Producer, Queue  # noqa: E402

HERE = os.path.abspath(__file__)
APP_NAME = 'bench'
APP_VERSION = kazoo_green.__version__
NODE = '%s@%s' % (APP_NAME, os.uname().nodename)
CLK_TCK = os.sysconf('SC_CLK_TCK')


# -- measuring ---------------------------------------------------------------
def code_version():
    """The git commit of the checkout, '+dirty' when kazoo_green/ has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(HERE))
    try:
        head = subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'],
                              capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--',
                                'kazoo_green'], capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except Exception:
        return 'unknown'
    return (head or 'unknown') + ('+dirty' if dirty else '')


def check_loopback(url):
    host = Connection(url).hostname or ''
    if host == 'localhost':
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit('core_bench: only loopback brokers may be benchmarked, not %r' % host)


def cpu_self():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_pids(pids):
    """CPU seconds (user+sys) used so far by ``pids`` (from /proc); dead ones count 0."""
    total = 0.0
    for pid in pids:
        try:
            with open('/proc/%d/stat' % pid) as f:
                fields = f.read().rsplit(')', 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            pass
    return total


def cpu_machine():
    """CPU seconds all processes of the machine used so far (from /proc/stat)."""
    try:
        with open('/proc/stat') as f:
            fields = f.readline().split()[1:]
        v = [int(x) for x in fields]
        # user nice system idle iowait irq softirq steal ...
        return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK
    except (OSError, ValueError, IndexError):
        return None


def find_broker_pid():
    """The RabbitMQ node: the oldest beam.smp (rabbitmqctl runs short-lived ones)."""
    best = None
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open('/proc/%s/comm' % name) as f:
                if f.read().strip() != 'beam.smp':
                    continue
            with open('/proc/%s/stat' % name) as f:
                start = int(f.read().rsplit(')', 1)[1].split()[19])
        except (OSError, ValueError, IndexError):
            continue
        if best is None or start < best[0]:
            best = (start, int(name))
    return [best[1]] if best else []


class Meter(object):
    """Wall time and CPU of this process, of the watched processes, and of the rest."""

    def __init__(self, watch=None):
        self.watch = watch or {}  # label -> [pids]

    def __enter__(self):
        self.others0 = {k: cpu_pids(v) for k, v in self.watch.items()}
        self.machine0 = cpu_machine()
        self.cpu0 = cpu_self()
        self.t0 = perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = perf_counter() - self.t0
        self.cpu = cpu_self() - self.cpu0
        machine = cpu_machine()
        self.load = {}  # label -> share of one core during the block
        used = self.cpu
        for k, pids in self.watch.items():
            c = cpu_pids(pids) - self.others0[k]
            used += c
            self.load[k] = c / self.wall
        self.load['bench'] = self.cpu / self.wall
        if machine is not None and self.machine0 is not None:
            self.load['foreign'] = max(0.0, (machine - self.machine0 - used) / self.wall)
        return False


class Snap(object):
    """CPU counters at one instant, for spans that start inside a callback."""

    def __init__(self, watch):
        self.t = perf_counter()
        self.cpu = cpu_self()
        self.machine = cpu_machine()
        self.others = {k: cpu_pids(v) for k, v in watch.items()}

    def load_since(self, start):
        """(wall seconds, CPU seconds of this process, load dict) from ``start`` to self."""
        wall = self.t - start.t
        cpu = self.cpu - start.cpu
        load = {'bench': cpu / wall}
        used = cpu
        for k, v in self.others.items():
            c = v - start.others[k]
            used += c
            load[k] = c / wall
        if self.machine is not None and start.machine is not None:
            load['foreign'] = max(0.0, (self.machine - start.machine - used) / wall)
        return wall, cpu, load


def pct(samples, p):
    s = sorted(samples)
    if not s:
        return float('nan')
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


# -- messages ------------------------------------------------------------------
def envelope(payload):
    """What kazoo_green stamps on every message, done by hand on the plain side."""
    msg = dict(payload)
    msg['App-Name'] = APP_NAME
    msg['App-Version'] = APP_VERSION
    msg['Node'] = NODE
    msg['Msg-ID'] = str(uuid.uuid4())
    return msg


def padded_payload(base, target_bytes):
    """``base`` plus a ``Pad`` field so the stamped JSON body is about ``target_bytes``."""
    probe = envelope(base)
    probe['Pad'] = ''
    size = len(json.dumps(probe, separators=(',', ':')))
    out = dict(base)
    out['Pad'] = 'x' * max(0, target_bytes - size)
    return out


def query_payload(i):
    return {'Event-Category': 'route', 'Event-Name': 'req', 'To': 'alice', 'From': 'bob',
            'Call-ID': 'bench-%d@127.0.0.1' % i}


# -- broker topology (plain kombu admin connection) -----------------------------
class Admin(object):
    def __init__(self, url):
        self.url = url
        self.conn = None
        self.ch = None
        self.targeted_existed = None

    def connect(self, timeout=60.0):
        """(Re)connect, waiting up to ``timeout`` for the broker to be back."""
        if self.conn is not None:
            try:
                self.conn.collect()
            except Exception:
                pass
        deadline = perf_counter() + timeout
        while True:
            try:
                conn = Connection(self.url, connect_timeout=2)
                conn.connect()
                self.conn, self.ch = conn, conn.channel()
                return
            except Exception:
                if perf_counter() > deadline:
                    raise
                gevent.sleep(0.5)

    def _exists_exchange(self, name):
        ch = self.conn.channel()
        try:
            ch.exchange_declare(exchange=name, type='direct', passive=True)
            return True
        except self.conn.channel_errors:
            return False
        finally:
            try:
                ch.close()
            except Exception:
                pass

    def setup(self):
        if self.conn is None:
            self.connect()
        if self.targeted_existed is None:
            self.targeted_existed = self._exists_exchange(TARGETED)
        ch = self.ch
        if not self._exists_exchange(TARGETED):
            # As kazoo_green would declare it (direct, not durable).
            ch.exchange_declare(exchange=TARGETED, type='direct', durable=False,
                                auto_delete=False)
        for ex in (EX_CALLMGR, EX_PUBLISH, EX_EVENTS):
            ch.exchange_declare(exchange=ex, type='topic', durable=False, auto_delete=False)
        for q, ex, rk in ((Q_REQUESTS, EX_CALLMGR, RK_REQUEST), (Q_PUBLISH, EX_PUBLISH, '#'),
                          (Q_EVENTS, EX_EVENTS, 'ev.#')):
            ch.queue_declare(queue=q, durable=False, exclusive=False, auto_delete=False)
            ch.queue_bind(queue=q, exchange=ex, routing_key=rk)
            ch.queue_purge(queue=q)

    def count(self, queue):
        return self.ch.queue_declare(queue=queue, passive=True).message_count

    def wait_count(self, queue, n, timeout=10.0, poll=0.02):
        deadline = perf_counter() + timeout
        c = self.count(queue)
        while c < n and perf_counter() < deadline:
            gevent.sleep(poll)
            c = self.count(queue)
        return c

    def purge(self, queue):
        self.ch.queue_purge(queue=queue)

    def preload(self, exchange, routing_key, bodies):
        """Fill a queue fast (py-amqp basic_publish of prepared messages)."""
        ch = self.ch
        for body in bodies:
            ch.basic_publish(amqp.Message(body, content_type='application/json',
                                          content_encoding='utf-8'),
                             exchange=exchange, routing_key=routing_key)

    def cleanup(self):
        errors = []
        try:
            conn = Connection(self.url, connect_timeout=2)
            conn.connect()
            for q in (Q_REQUESTS, Q_PUBLISH, Q_EVENTS):
                try:
                    conn.channel().queue_delete(queue=q)
                except Exception as exc:
                    errors.append('queue %s: %s' % (q, exc))
            for ex in (EX_CALLMGR, EX_PUBLISH, EX_EVENTS):
                try:
                    conn.channel().exchange_delete(exchange=ex)
                except Exception as exc:
                    errors.append('exchange %s: %s' % (ex, exc))
            if self.targeted_existed is False:
                try:
                    conn.channel().exchange_delete(exchange=TARGETED, if_unused=True)
                except Exception:
                    errors.append("exchange 'targeted' (absent before the run) left in place: "
                                  'something else is bound to it now')
            conn.release()
        except Exception as exc:
            errors.append(str(exc))
        if self.conn is not None:
            try:
                self.conn.release()
            except Exception:
                pass
        return errors


# -- responders --------------------------------------------------------------
class Responders(object):
    def __init__(self, url, n):
        self.procs = []
        for _ in range(n):
            p = subprocess.Popen([sys.executable, HERE, RESPONDER_FLAG, '--url', url],
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 universal_newlines=True)
            self.procs.append(p)
        for p in self.procs:
            with gevent.Timeout(30, RuntimeError('a responder did not start in 30 s')):
                line = p.stdout.readline()
            if line.strip() != 'ready':
                raise RuntimeError('a responder failed to start (%r)' % line)

    @property
    def pids(self):
        return [p.pid for p in self.procs]

    def stop(self):
        handled = 0
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                out, _ = p.communicate(timeout=5)
                for line in out.splitlines():
                    if line.startswith('handled '):
                        handled += int(line.split()[1])
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        return handled


# ---------------------------------------------------------------------------
# Plain kombu reference implementations
# ---------------------------------------------------------------------------
def plain_publish(url, n, payload, watch=None):
    with Connection(url) as conn:
        conn.connect()
        producer = Producer(conn.channel(),
                            exchange=Exchange(EX_PUBLISH, type='topic', durable=False))
        publish = producer.publish
        with Meter(watch) as m:
            for _ in range(n):
                publish(envelope(payload), routing_key='pub.bench', serializer='json',
                        delivery_mode=1)
    return m


class PlainQuerier(object):
    """Queries over RabbitMQ direct reply-to on one connection and channel."""

    def __init__(self, url):
        self.conn = Connection(url)
        self.conn.connect()
        self.channel = self.conn.channel()
        self.producer = Producer(self.channel,
                                 exchange=Exchange(EX_CALLMGR, type='topic', durable=False))
        # Producer.publish does maybe_declare(exchange) on its first call, a
        # synchronous round trip: do it now, before a reader greenlet owns the
        # socket (else two greenlets wait on it: ConcurrentObjectUseError).
        self.producer.maybe_declare(self.producer.exchange)
        self.replies = {}
        self.channel.basic_consume(queue=DIRECT_REPLY_TO, no_ack=True,
                                   callback=self._on_reply)
        self.reader = None
        self.lock = Semaphore()
        self.running = False

    def _on_reply(self, message):
        result = self.replies.pop(message.properties.get('correlation_id'), None)
        if result is not None:
            result.set(json.loads(message.body))

    def _send(self, payload):
        msg = envelope(payload)
        cid = msg['Msg-ID']
        result = AsyncResult()
        self.replies[cid] = result
        self.producer.publish(msg, routing_key=RK_REQUEST, serializer='json',
                              reply_to=DIRECT_REPLY_TO, correlation_id=cid, delivery_mode=1)
        return cid, result

    def query_sync(self, payload, timeout=2.0):
        """Sequential: publish, then drain_events until the reply arrived."""
        cid, result = self._send(payload)
        deadline = perf_counter() + timeout
        while not result.ready():
            remaining = deadline - perf_counter()
            if remaining <= 0:
                self.replies.pop(cid, None)
                raise RuntimeError('plain query timed out')
            self.conn.drain_events(timeout=remaining)
        return result.get()

    # concurrent: one reader greenlet; publishes serialised by a lock
    def start_reader(self):
        self.running = True
        self.reader = gevent.spawn(self._read_loop)

    def _read_loop(self):
        drain = self.conn.drain_events
        while self.running:
            try:
                drain(timeout=0.1)
            except socket.timeout:
                pass
            except Exception as exc:  # connection gone: fail everybody waiting
                pending, self.replies = self.replies, {}
                for result in pending.values():
                    result.set_exception(exc)
                return

    def query_async(self, payload, timeout=2.0):
        with self.lock:
            cid, result = self._send(payload)
        try:
            return result.get(timeout=timeout)
        finally:
            self.replies.pop(cid, None)

    def close(self):
        self.running = False
        if self.reader is not None:
            self.reader.join(1)
            if not self.reader.dead:
                self.reader.kill()
        try:
            self.conn.release()
        except Exception:
            pass


def plain_dispatch(url, n, prefetch, watch):
    state = {'count': 0, 'first': None}

    def on_message(message):
        if state['first'] is None:
            state['first'] = Snap(watch)
        message.payload  # decode the JSON, as kazoo_green does for its handlers
        message.ack()
        state['count'] += 1

    queue = Queue(Q_EVENTS, exchange=Exchange(EX_EVENTS, type='topic', durable=False),
                  routing_key='ev.#', durable=False, auto_delete=False)
    with Connection(url) as conn:
        conn.connect()
        with Consumer(conn.channel(), queues=[queue], on_message=on_message,
                      prefetch_count=prefetch, accept=['json']):
            while state['count'] < n:
                conn.drain_events(timeout=10)
            end = Snap(watch)
    return state['count'], state['first'], end


# ---------------------------------------------------------------------------
# kazoo_green sides
# ---------------------------------------------------------------------------
def new_kazoo(url, **kw):
    return Kazoo(url, app_name=APP_NAME, workers=8, query_timeout=2.0, **kw)


def close_kazoo(kz):
    kz.stop()
    # stop() returns at once on a runtime that was never start()ed, leaving the
    # connection a caller-driven publish/query made open: close that one here.
    if kz.connected:
        kz._pub_link.stop()


def kg_dispatch(url, n, prefetch, watch):
    kz = new_kazoo(url)
    state = {'count': 0, 'first': None}

    @kz.event_route('kazoo:consumer-event-bench-ev')
    def handler(payload, meta):
        if state['first'] is None:
            state['first'] = Snap(watch)
        state['count'] += 1

    kz.subscribe(EX_EVENTS, 'ev.#', queue=Q_EVENTS, exchange_type='topic', ack='late',
                 prefetch=prefetch)
    kz.start()
    try:
        if not kz.wait_connected(10):
            raise RuntimeError('kazoo_green did not connect')
        deadline = perf_counter() + 60
        while kz.stats()['acked'] < n and perf_counter() < deadline:
            gevent.sleep(0.002)
        end = Snap(watch)
        stats = kz.stats()
    finally:
        close_kazoo(kz)
    if stats['acked'] < n:
        raise RuntimeError('kazoo_green acked only %d of %d (stats %s)' % (
            stats['acked'], n, {k: v for k, v in stats.items() if v}))
    return stats['acked'], state['first'], end


# ---------------------------------------------------------------------------
# One side of one line, one round: (re)creates its connections every time
# ---------------------------------------------------------------------------
def measure_sequential(query, n, watch):
    lat = []
    for i in range(min(100, n)):  # warm-up
        query(query_payload(i))
    with Meter(watch) as m:
        for i in range(n):
            t = perf_counter()
            query(query_payload(i))
            lat.append(perf_counter() - t)
    return {'p50_ms': pct(lat, 50) * 1e3, 'p99_ms': pct(lat, 99) * 1e3,
            'rate': n / m.wall, 'cpu_us': m.cpu / n * 1e6, 'load': m.load}


def measure_concurrent(query, n, greenlets, watch):
    per = n // greenlets
    errors = []

    def worker(k, count):
        for i in range(count):
            try:
                query(query_payload(k * per + i))
            except Exception as exc:
                errors.append(exc)

    gevent.joinall([gevent.spawn(worker, k, 10) for k in range(greenlets)])  # warm-up
    if errors:
        raise RuntimeError('concurrent warm-up failed: %r' % errors[0])
    with Meter(watch) as m:
        gevent.joinall([gevent.spawn(worker, k, per) for k in range(greenlets)])
    if errors:
        raise RuntimeError('%d of %d concurrent queries failed, first: %r'
                           % (len(errors), per * greenlets, errors[0]))
    total = per * greenlets
    return {'rate': total / m.wall, 'cpu_us': m.cpu / total * 1e6, 'load': m.load}


class Bench(object):
    def __init__(self, args):
        self.args = args
        self.url = args.url
        self.admin = Admin(args.url)
        self.responders = None
        self.watch = {}
        self.notes = []
        self.failures = 0
        if args.quick:
            self.n = dict(pub=6000, seq=600, conc=2000, ev=6000)
            self.repeat = args.repeat or 3
        else:
            self.n = dict(pub=20000, seq=2000, conc=5000, ev=20000)
            self.repeat = args.repeat or 3
        self.pub_payload = padded_payload({
            'Event-Category': 'bench', 'Event-Name': 'pub', 'Call-ID': 'bench-pub@127.0.0.1',
            'From': 'bob', 'To': 'alice'}, 300)
        self.ev_payload = padded_payload({
            'Event-Category': 'bench', 'Event-Name': 'ev', 'Call-ID': 'bench-ev@127.0.0.1'}, 300)

    # -- robustness: the broker may be restarted by somebody else -----------
    def recover(self):
        self.admin.connect(timeout=60)
        self.admin.setup()
        self.watch['broker'] = find_broker_pid()
        if self.responders is not None:
            # They reconnect by themselves; wait until one answers again.
            deadline = perf_counter() + 30
            while True:
                try:
                    q = PlainQuerier(self.url)
                    try:
                        q.query_sync(query_payload(0), timeout=1.0)
                    finally:
                        q.close()
                    return
                except Exception:
                    if perf_counter() > deadline:
                        raise
                    gevent.sleep(0.5)

    def attempt(self, line, side, fn):
        for tries in range(3):
            try:
                return fn()
            except Exception as exc:
                self.failures += 1
                self.notes.append('%s/%s: a round failed (%s: %s); %s' % (
                    line, side, type(exc).__name__, str(exc)[:160],
                    'retried after the broker answered again' if tries < 2 else 'gave up'))
                if self.args.verbose:
                    traceback.print_exc()
                gevent.sleep(1)
                try:
                    self.recover()
                except Exception as exc2:
                    self.notes.append('recovery failed: %s' % exc2)
                    return None
        return None

    def rounds(self, line, sides):
        """Run every side ``repeat`` times, alternating the order each round."""
        out = {name: [] for name, _ in sides}
        for r in range(self.repeat):
            order = sides if r % 2 == 0 else sides[::-1]
            for name, fn in order:
                res = self.attempt(line, name, fn)
                if res is not None:
                    out[name].append(res)
        return out

    # -- the lines -----------------------------------------------------------
    def line_publish(self):
        n, payload, admin = self.n['pub'], self.pub_payload, self.admin

        def check(side, m):
            """Wait until the queue holds all: returns the seconds from the first publish."""
            got = admin.wait_count(Q_PUBLISH, n, poll=0.005)
            queued = perf_counter() - m.t0
            admin.purge(Q_PUBLISH)
            if got != n:
                self.notes.append('publish/%s: the queue got %d of %d messages' % (side, got, n))
            return queued

        def plain():
            admin.purge(Q_PUBLISH)
            m = plain_publish(self.url, n, payload, {'broker': self.watch['broker']})
            queued = check('plain', m)
            return {'rate': n / m.wall, 'queued_rate': n / queued, 'cpu_us': m.cpu / n * 1e6,
                    'load': m.load}

        def kg():
            kz = new_kazoo(self.url)
            try:
                kz.publish(EX_PUBLISH, 'pub.warm', payload)  # connect outside the timing
                admin.wait_count(Q_PUBLISH, 1)
                admin.purge(Q_PUBLISH)
                publish = kz.publish
                with Meter({'broker': self.watch['broker']}) as m:
                    for _ in range(n):
                        publish(EX_PUBLISH, 'pub.bench', payload)
                queued = check('kazoo_green', m)
            finally:
                close_kazoo(kz)
            return {'rate': n / m.wall, 'queued_rate': n / queued, 'cpu_us': m.cpu / n * 1e6,
                    'load': m.load}

        return self.rounds('publish', [('plain', plain), ('kg', kg)])

    def line_sequential(self):
        n, watch = self.n['seq'], self.watch

        def plain():
            q = PlainQuerier(self.url)
            try:
                return measure_sequential(q.query_sync, n, watch)
            finally:
                q.close()

        def kg(start):
            def run():
                kz = new_kazoo(self.url)
                try:
                    if start:
                        kz.start()
                        kz.wait_connected(10)
                    return measure_sequential(
                        lambda p: kz.query(EX_CALLMGR, RK_REQUEST, p), n, watch)
                finally:
                    close_kazoo(kz)
            return run

        return self.rounds('sequential', [('plain', plain), ('kg', kg(False)),
                                          ('kg_bg', kg(True))])

    def line_concurrent(self):
        n, g, watch = self.n['conc'], self.args.greenlets, self.watch

        def plain():
            q = PlainQuerier(self.url)
            q.start_reader()
            try:
                return measure_concurrent(q.query_async, n, g, watch)
            finally:
                q.close()

        def kg():
            kz = new_kazoo(self.url)
            kz.start()
            try:
                kz.wait_connected(10)
                return measure_concurrent(lambda p: kz.query(EX_CALLMGR, RK_REQUEST, p),
                                          n, g, watch)
            finally:
                close_kazoo(kz)

        return self.rounds('concurrent', [('plain', plain), ('kg', kg)])

    def line_dispatch(self):
        n, prefetch, admin = self.n['ev'], self.args.prefetch, self.admin
        bodies = [json.dumps(envelope(self.ev_payload), separators=(',', ':')).encode()
                  for _ in range(n)]
        watch = {'broker': self.watch.get('broker', [])}

        def one(fn, side):
            def run():
                admin.purge(Q_EVENTS)
                admin.preload(EX_EVENTS, RK_EVENTS, bodies)
                got = admin.wait_count(Q_EVENTS, n)
                if got != n:
                    raise RuntimeError('preload: the queue got %d of %d messages' % (got, n))
                count, first, end = fn(self.url, n, prefetch, watch)
                wall, cpu, load = end.load_since(first)
                # Timed from the first delivery: rate over the messages after it.
                return {'rate': (count - 1) / wall, 'cpu_us': cpu / (count - 1) * 1e6,
                        'load': load}
            return run

        out = self.rounds('dispatch', [('plain', one(plain_dispatch, 'plain')),
                                       ('kg', one(kg_dispatch, 'kg'))])
        admin.purge(Q_EVENTS)
        return out

    def run(self, only):
        results = {}
        self.admin.connect(timeout=30)
        self.admin.setup()
        self.watch['broker'] = find_broker_pid()
        try:
            if 'publish' in only:
                results['publish'] = self.line_publish()
            if {'sequential', 'concurrent'} & only:
                self.responders = Responders(self.url, self.args.responders)
                self.watch['responder'] = self.responders.pids
                if 'sequential' in only:
                    results['sequential'] = self.line_sequential()
                if 'concurrent' in only:
                    results['concurrent'] = self.line_concurrent()
                handled = self.responders.stop()
                self.responders = None
                self.watch.pop('responder', None)
                self.notes.append('the responders answered %d requests in all' % handled)
            if 'dispatch' in only:
                results['dispatch'] = self.line_dispatch()
        finally:
            if self.responders is not None:
                self.responders.stop()
            errors = self.admin.cleanup()
            if errors:
                self.notes.append('cleanup: ' + '; '.join(errors))
        return results


# ---------------------------------------------------------------------------
def report(results, bench, elapsed):
    args, n, notes = bench.args, bench.n, bench.notes

    def med(runs, key):
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else float('nan')

    def load(runs, who):
        vals = [r['load'][who] for r in runs if who in r.get('load', {})]
        return statistics.median(vals) if vals else None

    rows = []

    def add(line, unit, p_runs, k_runs, key, lower_is_better, target, cpu=True):
        p, k = med(p_runs, key), med(k_runs, key)
        ratio = (k / p) if lower_is_better else (p / k)
        if cpu:
            cp, ck = med(p_runs, 'cpu_us'), med(k_runs, 'cpu_us')
        else:
            cp = ck = float('nan')
        verdict = []
        if ratio == ratio and 'ratio' in target:
            verdict.append('ok' if ratio <= 1.3 else '%.2fx > 1.3' % ratio)
        if unit == 'ms' and 'p50' in line:
            verdict.append('p50 < 1 ms' if k < 1.0 else 'p50 %.2f ms >= 1 ms' % k)
        if line.startswith('3.'):
            verdict.append('>= 3000/s' if k >= 3000 else '%.0f/s < 3000/s' % k)
        rows.append((line, unit, p, k, ratio, cp, ck, target, ', '.join(verdict)))

    if 'publish' in results:
        r = results['publish']
        add('1. publish, %d msgs (kg: no start())' % n['pub'], 'msg/s', r['plain'], r['kg'],
            'rate', False, 'ratio <= 1.3')
        add('1b. same, until the queue holds them all', 'msg/s', r['plain'], r['kg'],
            'queued_rate', False, '(info: broker intake)', cpu=False)
    if 'sequential' in results:
        r = results['sequential']
        for side, label in (('kg', 'caller-driven'), ('kg_bg', 'start()')):
            add('2. sequential query p50, kg %s' % label, 'ms', r['plain'], r[side], 'p50_ms',
                True, 'p50 < 1 ms, ratio <= 1.3')
            add('2. sequential query p99, kg %s' % label, 'ms', r['plain'], r[side], 'p99_ms',
                True, 'ratio <= 1.3')
            add('2. sequential query, %d calls, kg %s' % (n['seq'], label), 'calls/s',
                r['plain'], r[side], 'rate', False, 'ratio <= 1.3')
    if 'concurrent' in results:
        r = results['concurrent']
        add('3. concurrent query, %d greenlets, %d calls' % (args.greenlets, n['conc']),
            'calls/s', r['plain'], r['kg'], 'rate', False, '>= 3000/s, ratio <= 1.3')
    if 'dispatch' in results:
        r = results['dispatch']
        add('4. event dispatch, late ack, %d msgs' % n['ev'], 'msg/s', r['plain'], r['kg'],
            'rate', False, 'ratio <= 1.3')

    def fmt(v, unit):
        if v != v:
            return '-'
        if unit == 'ms':
            return '%.3f' % v
        return '{:,.0f}'.format(v)

    def fmtr(v, spec='%.2f'):
        return '-' if v != v else spec % v

    print()
    print('| line | unit | plain kombu | kazoo_green | cost ratio kg/plain | '
          'CPU µs/op plain | CPU µs/op kg | CPU ratio | target | verdict |')
    print('|---|---|---:|---:|---:|---:|---:|---:|---|---|')
    for line, unit, p, k, ratio, cp, ck, target, verdict in rows:
        print('| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |' % (
            line, unit, fmt(p, unit), fmt(k, unit), fmtr(ratio), fmtr(cp, '%.1f'),
            fmtr(ck, '%.1f'), fmtr(ck / cp if cp and ck else float('nan')), target,
            verdict or '-'))
    print()
    print('Cost ratio = time per operation of kazoo_green / of plain kombu (for latencies '
          'kg latency / plain latency): above 1 kazoo_green is slower. CPU µs/op: user+sys '
          'of the benchmarking process only, per message or per query. Medians of %d '
          'round(s) per side. Line 1 times the publish loop only (fire-and-forget: it may '
          'end while messages still sit in socket buffers); 1b times from the first publish '
          'until the queue holds them all (polled every 5 ms), i.e. what the broker took '
          'in.' % bench.repeat)
    print()
    print('CPU load during the rounds (share of one core; median round; "foreign" = other '
          'processes on this machine):')
    print()
    print('| line | side | bench | responder(s) | broker | foreign |')
    print('|---|---|---:|---:|---:|---:|')
    labels = {'plain': 'plain', 'kg': 'kazoo_green', 'kg_bg': 'kazoo_green start()'}
    for line in ('publish', 'sequential', 'concurrent', 'dispatch'):
        if line not in results:
            continue
        for side, runs in results[line].items():
            if line == 'sequential' and side == 'kg':
                label = 'kazoo_green caller-driven'
            else:
                label = labels[side]
            cells = []
            for who in ('bench', 'responder', 'broker', 'foreign'):
                v = load(runs, who)
                cells.append('-' if v is None else '%.0f%%' % (v * 100))
            print('| %s | %s | %s |' % (line, label, ' | '.join(cells)))
    print()
    print("Plain side: publish = kombu Producer.publish(serializer='json', delivery_mode=1) "
          'of the same envelope kazoo_green stamps (App-Name, App-Version, Node, uuid4 '
          'Msg-ID); queries = direct reply-to, Producer.publish then drain_events '
          '(sequential), or one reader greenlet + an AsyncResult per correlation_id + a '
          'publish lock (concurrent); dispatch = kombu Consumer(on_message) reading '
          'message.payload then message.ack(), prefetch %d on both sides, timed from the '
          'first delivery to the last ack.' % args.prefetch)
    for note in notes:
        print('note: %s' % note)
    print('total run time %.1f s, load average now %s' % (
        elapsed, ' '.join('%.2f' % x for x in os.getloadavg())))
    sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--url', default=DEFAULT_URL, help='broker URL (loopback only)')
    parser.add_argument('--quick', action='store_true', help='short run (about 20 s)')
    parser.add_argument('--repeat', type=int, default=None,
                        help='rounds per side and line, median shown (default 3)')
    parser.add_argument('--responders', type=int, default=1,
                        help='responder processes (default 1)')
    parser.add_argument('--greenlets', type=int, default=50)
    parser.add_argument('--prefetch', type=int, default=200)
    parser.add_argument('--only', default='publish,sequential,concurrent,dispatch',
                        help='comma-separated subset of the lines to run')
    parser.add_argument('--json', metavar='PATH', help='also write the raw results there')
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='show tracebacks of failed rounds and kazoo_green warnings')
    args = parser.parse_args(argv)
    check_loopback(args.url)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.CRITICAL,
                        format='%(levelname)s %(name)s: %(message)s')

    bench = Bench(args)
    sizes = {
        'kazoo_green publish body': len(kazoo_green.wire.dumps(kazoo_green.wire.stamp(
            bench.pub_payload, APP_NAME, APP_VERSION, NODE))),
        'plain publish body (kombu json)': len(
            kombu.utils.json.dumps(envelope(bench.pub_payload))),
        'event body': len(json.dumps(envelope(bench.ev_payload), separators=(',', ':'))),
    }
    print('# kazoo_green core benchmark')
    print()
    print('kazoo_green %s (git %s), kombu %s, py-amqp %s, gevent %s, Python %s, %d CPUs, '
          'broker %s, load average %s' % (
              kazoo_green.__version__, code_version(), kombu.__version__, amqp.__version__,
              gevent.__version__,
              platform.python_version(), os.cpu_count(), Connection(args.url).as_uri(),
              ' '.join('%.2f' % x for x in os.getloadavg())))
    print('%s run: %d round(s) per side and line, %d responder process(es); message sizes: %s'
          % ('quick' if args.quick else 'full', bench.repeat, args.responders,
             ', '.join('%s %d B' % kv for kv in sizes.items())))
    sys.stdout.flush()

    started = perf_counter()
    results = bench.run(set(args.only.split(',')))
    report(results, bench, perf_counter() - started)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w') as f:
            json.dump({'results': results, 'notes': bench.notes, 'sizes': sizes,
                       'n': bench.n, 'repeat': bench.repeat, 'quick': args.quick,
                       'responders': args.responders}, f, indent=1, default=str)
    return 0


if __name__ == '__main__':
    sys.exit(main())
