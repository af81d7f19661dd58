"""CPU per reply on the resuming side of an async query, without Kamailio.

What a ``kazoo_resumer`` process pays for one reply, against the least Python that can
do it (py-bound-async's loop): each in a process of its own, consuming a resume queue of
the local RabbitMQ that a feeder process fills with replies at ``--rate`` a second (as a
responder answers, ``Kazoo.respond``), the process's CPU time (user+system) from the
first reply resumed to the last, per reply:

* ``kg``: ``kazoo_resumer`` of examples/kamailio/router.py's own runtime and ``Router``
  (``resume_in_consumer=False``, statistics declared): the ResumeLoop, acks, Msg-ID
  checks, bookkeeping, ``t_continue`` into ``kazoo_resume_route_reply``, the router's
  ``route_reply`` (``$ru`` and a 302);
* ``bare``: bench/systems/bound_async.py's loop (``no_ack``, frames cut out of the
  stream, orjson, ``t_continue`` into a method setting ``$ru`` and replying).

``KSR`` is a stand-in whose calls do nothing but return (``t_continue`` calls the
handler's method): Kamailio's own work is left out, what is left is the Python. Runs
alternate kg, bare, bare, kg, ... so a drift of the machine falls on both.

``--cpu N`` pins the resumer to core N and the feeder to the other (much less spread);
``--thrash`` adds a nice 19 process on the resumer's core sweeping 32 MB, so that every
wake-up starts with cold caches, as in Kamailio, where the SIP workers, sipp, the
broker and the responder run between two wake-ups of a resumer. Without it a resumer
runs warm and the two differ by much less than in Kamailio (``bench/ab.py``, which
stays the judge: this is the quick look).

``--trace``: the kg resumer's Python bytecodes per reply, per function (``sys.settrace``
with opcode events, over ``--replies`` replies after a warm-up), a count that does not
depend on the machine's noise. ``--profile``: the same replies under cProfile
(deterministic: its overhead inflates every call, the call counts are exact).

    .venv/bin/python bench/resume_cost.py [--replies 3000] [--rate 700] [--runs 3]
        [--cpu 1 [--thrash]] [--trace] [--profile]

Needs the local RabbitMQ (127.0.0.1:5672).
"""

import argparse
import collections
import os
import resource
import statistics
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
URL = 'amqp://guest:guest@127.0.0.1:5672//'
NODE = 'kamailio@resume-cost'
BARE_QUEUE = 'kg-resume-cost-bare'
WARMUP = 200


def fake_ksr(handler_ref, schema):
    """A ``KSR`` module whose functions return at once (``tmx.t_continue`` calls the
    handler's method, ``pv.get`` answers the statistics' ``$def``s)."""
    KSR = types.ModuleType('KSR')
    ok = (lambda *args: 1)
    defs = {'$def(KAZOO_GREEN_STATS)': schema, '$def(KAZOO_GREEN_HISTOGRAMS)': schema}
    KSR.pv = types.SimpleNamespace(get=defs.get, sets=ok, seti=ok)
    KSR.tm = types.SimpleNamespace(t_reply=ok, t_on_failure=ok, t_reset_fr=ok,
                                   t_set_fr=ok, t_newtran=ok)

    def t_continue(index, label, route):
        getattr(handler_ref[0], route)(None)
        return 1
    KSR.tmx = types.SimpleNamespace(t_continue=t_continue, t_suspend=ok)
    KSR.counters = types.SimpleNamespace(add=ok, inc=ok, reset=ok)
    KSR.xhttp_prom = types.SimpleNamespace(histogram_observe_l1=ok, histogram_observe_l0=ok)
    KSR.sl = types.SimpleNamespace(sl_send_reply=ok)
    for name in ('err', 'warn', 'notice', 'info', 'dbg', 'crit'):
        setattr(KSR, name, ok)
    return KSR


class Clock(object):
    """Process CPU time at the WARMUP-th reply and at the last one."""

    def __init__(self, replies, done, trace=False, profile=False):
        self.n = 0
        self.replies = replies
        self.done = done
        self.trace = trace
        self.profile = profile
        self.counts = collections.Counter()
        self.profiler = None
        self.start = self.end = None

    def tick(self):
        self.n += 1
        if self.n == WARMUP:
            self.start = resource.getrusage(resource.RUSAGE_SELF)
            if self.trace:
                self._trace_on()
            if self.profile:
                import cProfile
                self.profiler = cProfile.Profile()
                self.profiler.enable()
        elif self.n == WARMUP + self.replies:
            if self.trace:
                sys.settrace(None)
                frame = sys._getframe()
                while frame is not None:
                    frame.f_trace = None
                    frame = frame.f_back
            if self.profiler is not None:
                self.profiler.disable()
            self.end = resource.getrusage(resource.RUSAGE_SELF)
            self.done()

    def _trace_on(self):
        from bytecode_count import opcode_tracer   # bench/, this script's directory
        tracer = opcode_tracer(self.counts)
        frame = sys._getframe().f_back   # every frame up the stack: the loop's too
        while frame is not None:
            frame.f_trace = tracer
            frame.f_trace_opcodes = True
            frame = frame.f_back
        sys.settrace(tracer)

    def report(self):
        user = self.end.ru_utime - self.start.ru_utime
        system = self.end.ru_stime - self.start.ru_stime
        out = {'seconds': user + system, 'user': user, 'system': system,
               'replies': self.replies}
        if self.trace:
            out['bytecodes'] = dict(self.counts)
        if self.profiler is not None:
            import io
            import pstats
            text = io.StringIO()
            pstats.Stats(self.profiler, stream=text).sort_stats('tottime').print_stats(40)
            out['profile'] = text.getvalue()
        return out


def resumer_kg(args):
    handler_ref = [None]
    from kazoo_green._kamstats import SCHEMA
    sys.modules['KSR'] = fake_ksr(handler_ref, SCHEMA)
    os.environ['KAZOO_GREEN_NODE'] = NODE
    sys.path.insert(0, os.path.join(ROOT, 'examples', 'kamailio'))
    import router   # the example's runtime and Router, as Kamailio loads them

    def done():
        router.kz._loop.stop()
    clock = Clock(args.replies, done, args.trace, args.profile)

    class Timed(router.Router):
        def route_reply(self, msg):
            result = super(Timed, self).route_reply(msg)
            clock.tick()
            return result

    handler_ref[0] = handler = Timed(router.kz)
    handler.kazoo_resumer(None)     # returns once done() stopped its loop
    return clock


def resumer_bare(args):
    handler_ref = [None]
    sys.modules['KSR'] = fake_ksr(handler_ref, None)
    sys.path.insert(0, ROOT)
    from struct import Struct
    import orjson
    from kazoo_green import Kazoo
    from kazoo_green._amqpfast import _poll
    import KSR
    frame = Struct('>BHI')
    reply_box = [None]
    stop = [False]
    clock = Clock(args.replies, lambda: stop.__setitem__(0, True))

    class Bound(object):   # bench/systems/bound_async.py's resume
        def bound_resume(self, msg):
            KSR.pv.sets('$ru', str(reply_box[0].get('Route')))
            KSR.tm.t_reply(302, 'Moved Temporarily')
            clock.tick()
            return 1
    handler_ref[0] = Bound()

    kz = Kazoo(app_name='kamailio', node='kamailio@resume-cost-bare', blocking=True,
               heartbeat=0)
    link = kz._pub_link
    link.ensure(time.monotonic() + 10)
    channel = link._raw.channel()
    channel.queue_declare(queue=BARE_QUEUE, durable=False, exclusive=False,
                          auto_delete=True)
    channel.basic_consume(queue=BARE_QUEUE, no_ack=True)
    fast = link.fast
    buf = bytearray(fast._buf[fast._pos:])
    recv = fast._recv
    poller = _poll()
    poller.register(fast._fileno, 1)
    poll = poller.poll
    t_continue = KSR.tmx.t_continue
    while not stop[0]:
        while len(buf) >= 8:
            kind, _, size = frame.unpack_from(buf)
            if len(buf) < size + 8:
                break
            if kind == 3:
                reply = orjson.loads(bytes(buf[7:7 + size]))
                index, label, _ = reply['Msg-ID'].split(':', 2)
                reply_box[0] = reply
                t_continue(int(index), int(label), 'bound_resume')
            del buf[:size + 8]
        if stop[0]:
            break
        if poll(1000):   # (nothing yet: the feeder starts after this process)
            buf += recv(65536)
    return clock


def feed(kind, queue, total, rate):
    """Publish ``total`` replies to ``queue`` at ``rate`` a second, as a responder."""
    os.environ['KAZOO_GREEN_NO_PATCH'] = '1'
    sys.path.insert(0, ROOT)
    from kazoo_green import Kazoo
    from kazoo_green.wire import new_msg_id
    kz = Kazoo(URL, app_name='responder', blocking=True)
    channel = None
    deadline = time.monotonic() + 30
    while True:   # until the resumer consumes
        link = kz._pub_link
        link.ensure(time.monotonic() + 10)
        channel = channel or link._raw.channel()
        try:
            _, _, consumers = channel.queue_declare(queue=queue, passive=True)
        except Exception:
            channel = None
            consumers = 0
        if consumers:
            break
        if time.monotonic() > deadline:
            raise SystemExit('no consumer on %s' % queue)
        time.sleep(0.05)
    meta = types.SimpleNamespace(zone=None, via=None, properties=None)
    t0 = time.monotonic()
    for i in range(total):
        now = time.monotonic()
        if kind == 'kg':
            msg_id = 'kgasync:%d:%d:route_reply:route_timeout:%d:%d:%s:callmgr' % (
                i, i + 1, int((now + 60) * 1000), int(now * 1000000), new_msg_id())
        else:
            msg_id = '%d:%d:%s' % (i, i + 1, new_msg_id())
        user = 'async%d' % i
        request = {'Event-Category': 'route', 'Event-Name': 'req', 'To': user,
                   'From': 'caller', 'Call-ID': 'call-%d@bench' % i, 'Msg-ID': msg_id,
                   'App-Name': 'kamailio', 'Node': NODE, 'Server-ID': queue}
        meta.properties = {'reply_to': queue, 'correlation_id': msg_id}
        kz.respond(request, {'Event-Category': 'route', 'Event-Name': 'resp',
                             'Route': 'sip:%s@127.0.0.1:5090' % user}, meta)
        wait = t0 + (i + 1) / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)


def thrash():
    """Touch a cache line of 32 MB after another, forever."""
    memory = bytearray(32 << 20)
    view = memoryview(memory)
    while True:
        for start in range(0, len(memory), 1 << 20):
            view[start:start + (1 << 20):64] = bytes(1 << 14)


def run_one(kind, args):
    """A resumer of ``kind`` and its feeder; the resumer's report."""
    import json
    cmd = [sys.executable, os.path.abspath(__file__), '--child', kind,
           '--replies', str(args.replies)]
    if args.trace:
        cmd.append('--trace')
    if args.profile:
        cmd.append('--profile')
    if args.cpu is not None:   # the resumer alone on one core, the feeder on the other
        cmd = ['taskset', '-c', str(args.cpu)] + cmd
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    thrash = None
    if args.thrash:   # evicts the caches between wake-ups, as Kamailio's other processes do
        thrash = subprocess.Popen(['taskset', '-c', str(args.cpu), 'nice', '-n', '19',
                                   sys.executable, os.path.abspath(__file__), '--thrash-child'])
    queue = NODE + '-resume' if kind == 'kg' else BARE_QUEUE
    feed_cmd = [] if args.cpu is None else ['taskset', '-c', str(1 - args.cpu)]
    feeder = subprocess.Popen(feed_cmd + [sys.executable, os.path.abspath(__file__), '--feed', kind,
                               queue, str(WARMUP + args.replies + 50), str(args.rate)])
    try:
        out, _ = child.communicate(timeout=600)
        feeder.wait(timeout=60)
    finally:
        if thrash is not None:
            thrash.kill()
            thrash.wait()
    if child.returncode:
        raise SystemExit('%s resumer failed (%d)' % (kind, child.returncode))
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--replies', type=int, default=3000)
    parser.add_argument('--rate', type=float, default=700.0)
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--cpu', type=int, choices=(0, 1),
                        help='pin the resumer to this core and the feeder to the other')
    parser.add_argument('--thrash', action='store_true',
                        help='(with --cpu) a nice 19 process on the resumer\'s core '
                        'sweeping 32 MB, so every wake-up starts with cold caches')
    parser.add_argument('--thrash-child', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--trace', action='store_true')
    parser.add_argument('--profile', action='store_true')
    parser.add_argument('--child', choices=('kg', 'bare'))
    parser.add_argument('--feed', nargs=4, metavar=('KIND', 'QUEUE', 'TOTAL', 'RATE'))
    args = parser.parse_args()
    if args.thrash_child:
        thrash()
        return
    if args.thrash and args.cpu is None:
        parser.error('--thrash needs --cpu')
    if args.feed:
        kind, queue, total, rate = args.feed
        feed(kind, queue, int(total), float(rate))
        return
    if args.child:
        import json
        clock = (resumer_kg if args.child == 'kg' else resumer_bare)(args)
        sys.stdout.write(json.dumps(clock.report()) + '\n')
        sys.stdout.flush()
        os._exit(0)
    if args.trace or args.profile:
        report = run_one('kg', args)
        if args.trace:
            counts = collections.Counter(report['bytecodes'])
            n = args.replies
            print('kg resumer: %.0f bytecodes a reply in %d functions' % (
                sum(counts.values()) / n, len(counts)))
            for name, count in counts.most_common(40):
                print('  %7.1f  %s' % (count / n, name))
        if args.profile:
            print(report['profile'])
        return
    results = collections.defaultdict(list)
    order = ('kg', 'bare')
    for run in range(args.runs):
        for kind in (order if run % 2 == 0 else order[::-1]):
            report = run_one(kind, args)
            us = report['seconds'] / report['replies'] * 1e6
            results[kind].append(us)
            system = report['system'] / report['replies'] * 1e6
            results[kind + '_sys'].append(system)
            print('run %d %-4s %6.1f µs CPU a reply (kernel %.1f)' % (run + 1, kind, us, system),
                  flush=True)
    for kind in order:
        values = results[kind]
        print('%-4s %6.1f ± %.1f µs a reply, kernel %.1f (%d runs of %d replies at %.0f/s)'
              % (kind, statistics.mean(values),
                 statistics.stdev(values) if len(values) > 1 else 0.0,
                 statistics.mean(results[kind + '_sys']), len(values), args.replies,
                 args.rate))
    print('kg - bare: %.1f µs a reply' % (statistics.mean(results['kg'])
                                           - statistics.mean(results['bare'])))


if __name__ == '__main__':
    main()
