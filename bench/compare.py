"""kazoo_green against Kamailio's C modules: same responder, same SIP load, one run.

Nine systems, each a Kamailio started from its own config, answer the same INVITE
(R-URI user -> query ``callmgr``/``route.req`` -> 302 to ``sip:<user>@127.0.0.1:5090``),
one at a time, restarted for every measurement (only one can hold 127.0.0.1:5060):

    kg-sync     examples/kamailio/kamailio.cfg, query in the SIP worker
    kg-async    the same config, R-URI users starting with "async": suspend/resume
    c-kazoo     bench/systems/c_kazoo.cfg, the C kazoo module's kazoo_async_query
    c-rabbitmq  bench/systems/c_rabbitmq.cfg, the C rabbitmq module's
                rabbitmq_publish_consume with direct reply-to
    py-bound    bench/systems/bound.cfg, kg-sync's routing with a hand-written query (no
                layers, no error handling): the least a sync query in Python can cost
    floor       bench/systems/floor.cfg, app_python3 answering without any AMQP
    floor-async bench/systems/floor_async.cfg, the same answer from a second Python route
                (suspended with the async module, resumed by a core async worker): the
                least an async design with Python routes costs, without AMQP
    http-async  bench/systems/http_async.cfg, the same decision over HTTP instead of
                AMQP: http_async_client (suspend/resume, as kg-async) asking
                bench/http_responder.py (started here)
    sql         bench/systems/sqlops.cfg, the same decision read from PostgreSQL with
                sqlops in the SIP worker (as kg-sync); table kg_bench_routes, created
                here in the database of KG_BENCH_DB_URL (default
                postgres://postgres@127.0.0.1:5432/test)

and, only when asked for with --systems, kg-sync and kg-async against the TLS node of
tests/tls.py (booted here), once through its TLS listener and once through its plain
one, so TLS and plain TCP are compared on the same broker:

    kg-sync-tls, kg-async-tls    amqps://, the CA given as KAZOO_GREEN_AMQPS_CA_CERT
    kg-sync-tcp, kg-async-tcp    amqp:// to the same node

and kg-sync-nostats, kg-async-nostats: the example with KAZOO_GREEN_STATS_OFF=1 (no
statistics include, nothing pushed), for what kazoo_green's statistics cost per call;
kg-async-noshed: the example with KAZOO_GREEN_SHED_LAG=off (no async admission);
py-bound-async: bench/systems/bound_async.cfg, kg-async's routing with a hand-written
suspend, publish and resume loop (no acks, no deadline, no checks): the least an async
query written in Python can cost, as py-bound is for the sync one;
kg-sync-base, kg-async-base: the example as another checkout of kazoo_green has it (its
path in KG_BENCH_BASE, e.g. ``git worktree add /tmp/base HEAD``; this checkout's
virtualenv), so a change is measured against the commit before it side by side
(``bench/ab.py kg-async kg-async-base``).

All use one examples/responder.py (started here; one more on the TLS node for the TLS
systems) and the local RabbitMQ. Per system:
answered/failed calls at fixed offered rates (systems alternate within each rate, so
ratios hold on a noisy machine), the highest offered rate without a failure (steps up
x1.25 until failures, then bisects), p50/p99 response time and Kamailio CPU µs per call
(utime+stime of every Kamailio process / answered calls) at the reference rate, every
answered call's response time over the run at the reference rate (the plot's
latency-over-time panels: a stall shows as a spike or a gap), peak RSS
and PSS (sums over Kamailio's processes), whether Kamailio kept all its processes, and for
kg-sync and kg-async (``--survival all``: every system) the share of calls answered at
1.5x its own clean rate (--seconds) and whether it survives 3x its clean rate for 30 s
and then answers a 200 cps run completely ("recovered"). Every measurement starts
from a fresh Kamailio warmed up with 200 calls at 100 cps. Before the systems, a probe
runs the C module's sync ``kazoo_query`` (bench/systems/c_kazoo_sync.cfg) and reports what
happens to it (Debian's 5.6.3 crashes).

Prints a Markdown table plus ratios against c-kazoo, and writes it to
bench/results/compare-<timestamp>.md with two plots (.png, -latency.png; need matplotlib
from bench/requirements.txt). Needs RabbitMQ, Kamailio, sipp, the C modules,
http_async_client, db_postgres and a PostgreSQL: ``bash tests/tools/services.sh --bench``.

    .venv/bin/python bench/compare.py [--quick] [--systems kg-sync,c-kazoo,...]
        [--rates 500,1000,2000] [--seconds 10] [--ref-rate 1000] [--search-seconds 5]
        [--search-start 500] [--search-max 8000] [--bisect 2] [--survival kg-sync|all|none]
        [--survival-seconds 30]
"""

import argparse
import collections
import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kazoo_green  # noqa: E402,F401  (gevent patching for the harness' subprocesses)
from tests.e2e import harness  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
SYSTEMS_DIR = os.path.join(BENCH, 'systems')
RESULTS_DIR = os.path.join(BENCH, 'results')
MODULES_DIR = '/usr/lib/x86_64-linux-gnu/kamailio/modules'
TICK = os.sysconf('SC_CLK_TCK')
NODE = 'kamailio@kg-compare'          # kg-* node name (its async queue: NODE-resume)
KAZOO_NODE = 'kg-compare'             # c-kazoo's node_hostname (see c_kazoo.cfg)
CTL = 'unix:/tmp/kazoo_green_compare_ctl'
HTTP_PORT = 8091                      # bench/http_responder.py
DB_URL = os.environ.get('KG_BENCH_DB_URL', 'postgres://postgres@127.0.0.1:5432/test')


class TLSNodeBroker(object):
    """The TLS node of tests/tls.py, booted on first use: env for a Kamailio reaching it
    through its TLS or plain listener, and its queue list."""

    broker = None

    @classmethod
    def start(cls):
        if cls.broker is None:
            from tests.tls import start_tls_broker
            cls.broker = start_tls_broker()
        return cls.broker

    @classmethod
    def env(cls, tls):
        b = cls.start()
        if tls:
            return {'KAZOO_GREEN_BROKERS': b.amqps_url, 'KAZOO_GREEN_AMQPS_CA_CERT': b.ca}
        return {'KAZOO_GREEN_BROKERS': b.amqp_url}

    @classmethod
    def queues(cls):
        return harness.node_queues(cls.start().node)()

    @classmethod
    def stop(cls):
        if cls.broker is not None:
            cls.broker.node.stop()
            cls.broker = None


def _kg_ready(kamailio):
    """The example's own readiness: consumer link up and its resume queue consumed by
    two processes (the two kazoo_resumer)."""
    queues = TLSNodeBroker.queues if kamailio.system.broker else harness.rabbit_queues
    return ('consume link: connected' in kamailio.log()
            and queues().get('%s-resume' % NODE, (0, 0))[0] >= 2)


def _bound_async_ready(kamailio):
    """py-bound-async's two resuming processes consume its resume queue."""
    return harness.rabbit_queues().get('kg-bound-async-resume', (0, 0))[0] >= 2


def _c_kazoo_ready(kamailio):
    """The C kazoo module has bound its reply ("targeted") queues."""
    return any(name.startswith('kamailio@%s-' % KAZOO_NODE) for name in harness.rabbit_queues())


#: broker: None (the local RabbitMQ), 'tls' or 'tcp' (the TLS node, through its TLS or
#: its plain listener).
#: The example's router (and so kazoo_green) from the checkout KG_BENCH_BASE names, with
#: this checkout's virtualenv (router.py puts its own checkout first on sys.path).
BASE = os.environ.get('KG_BENCH_BASE')
BASE_ENV = {'KAZOO_GREEN_ROUTER': os.path.join(BASE or '/KG_BENCH_BASE-unset',
                                               'examples', 'kamailio', 'router.py'),
            'KAZOO_GREEN_VENV': os.path.join(harness.ROOT, '.venv')}
System = collections.namedtuple('System', 'name cfg user ready module broker env')
System.__new__.__defaults__ = (None, None)

SYSTEMS = collections.OrderedDict((s.name, s) for s in (
    System('kg-sync', harness.KAMAILIO_CFG, 'benchuser', _kg_ready, None),
    System('kg-async', harness.KAMAILIO_CFG, 'asyncbenchuser', _kg_ready, None),
    System('c-kazoo', os.path.join(SYSTEMS_DIR, 'c_kazoo.cfg'), 'benchuser',
           _c_kazoo_ready, 'kazoo'),
    System('c-rabbitmq', os.path.join(SYSTEMS_DIR, 'c_rabbitmq.cfg'), 'benchuser',
           None, 'rabbitmq'),
    System('py-bound', os.path.join(SYSTEMS_DIR, 'bound.cfg'), 'benchuser', None, None),
    System('floor', os.path.join(SYSTEMS_DIR, 'floor.cfg'), 'benchuser', None, None),
    System('floor-async', os.path.join(SYSTEMS_DIR, 'floor_async.cfg'), 'benchuser', None,
           'async'),
    System('http-async', os.path.join(SYSTEMS_DIR, 'http_async.cfg'), 'benchuser', None,
           'http_async_client', None,
           {'KG_BENCH_HTTP_URL': 'http://127.0.0.1:%d/route/' % HTTP_PORT}),
    System('sql', os.path.join(SYSTEMS_DIR, 'sqlops.cfg'), 'benchuser', None, 'db_postgres',
           None, {'KG_BENCH_SQLCON': 'kg=>' + DB_URL}),
))
#: Run only when named in --systems.
TLS_SYSTEMS = collections.OrderedDict((s.name, s) for s in (
    System('kg-sync-tcp', harness.KAMAILIO_CFG, 'benchuser', _kg_ready, None, 'tcp'),
    System('kg-sync-tls', harness.KAMAILIO_CFG, 'benchuser', _kg_ready, None, 'tls'),
    System('kg-async-tcp', harness.KAMAILIO_CFG, 'asyncbenchuser', _kg_ready, None, 'tcp'),
    System('kg-async-tls', harness.KAMAILIO_CFG, 'asyncbenchuser', _kg_ready, None, 'tls'),
    # The example without its statistics include: what pushing them costs per call.
    System('kg-sync-nostats', harness.KAMAILIO_CFG, 'benchuser', _kg_ready, None, None,
           {'KAZOO_GREEN_STATS_OFF': '1'}),
    System('kg-async-nostats', harness.KAMAILIO_CFG, 'asyncbenchuser', _kg_ready, None, None,
           {'KAZOO_GREEN_STATS_OFF': '1'}),
    # The example without async admission: no call refused early, however late.
    System('kg-async-noshed', harness.KAMAILIO_CFG, 'asyncbenchuser', _kg_ready, None, None,
           {'KAZOO_GREEN_SHED_LAG': 'off'}),
    # The least an async query written in Python can cost (bench/systems/bound_async.py).
    System('py-bound-async', os.path.join(SYSTEMS_DIR, 'bound_async.cfg'), 'benchuser',
           _bound_async_ready, None),
    # The example from another checkout (KG_BENCH_BASE): a change against its base.
    System('kg-sync-base', harness.KAMAILIO_CFG, 'benchuser', _kg_ready, None, None,
           BASE_ENV),
    System('kg-async-base', harness.KAMAILIO_CFG, 'asyncbenchuser', _kg_ready, None, None,
           BASE_ENV),
))
ALL_SYSTEMS = collections.OrderedDict(list(SYSTEMS.items()) + list(TLS_SYSTEMS.items()))
SYNC_PROBE = System('c-kazoo-sync', os.path.join(SYSTEMS_DIR, 'c_kazoo_sync.cfg'),
                    'benchuser', _c_kazoo_ready, 'kazoo')


def sip_answers(timeout=0.3):
    """True if something on 127.0.0.1:5060 answers an OPTIONS (any status)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(('127.0.0.1', 0))
        sock.settimeout(timeout)
        port, tag = sock.getsockname()[1], uuid.uuid4().hex[:12]
        sock.sendto(('OPTIONS sip:ping@127.0.0.1:%d SIP/2.0\r\n'
                     'Via: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK%s\r\n'
                     'From: <sip:compare@127.0.0.1>;tag=%s\r\nTo: <sip:ping@127.0.0.1>\r\n'
                     'Call-ID: %s\r\nCSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\n'
                     'Content-Length: 0\r\n\r\n' % (harness.SIP_PORT, port, tag, tag, tag)
                     ).encode(), ('127.0.0.1', harness.SIP_PORT))
        return sock.recv(4096).startswith(b'SIP/2.0 ')
    except OSError:
        return False
    finally:
        sock.close()


class BenchKamailio(harness.Kamailio):
    """harness.Kamailio for any config: ready once 5060 answers and ``ready(self)`` holds."""

    def __init__(self, log_path, system):
        super(BenchKamailio, self).__init__(log_path, node=NODE)
        self.system = system

    def start(self, timeout=30):
        if sip_answers():
            raise RuntimeError('something already answers on 127.0.0.1:%d' % harness.SIP_PORT)
        env = dict(os.environ, PWD=harness.ROOT, KAZOO_GREEN_CTL=CTL, KAZOO_GREEN_NODE=NODE,
                   KG_BENCH_SYSTEMS=SYSTEMS_DIR)
        if self.system.broker:
            env.update(TLSNodeBroker.env(self.system.broker == 'tls'))
        env.update(self.system.env or {})
        self._log = open(self.log_path, 'a')
        self.proc = subprocess.Popen(['kamailio', '-f', self.system.cfg, '-DD', '-E', '-m', '256'],
                                     cwd=harness.ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        ready = harness.wait_until(lambda: self.proc.poll() is not None or (
            sip_answers() and (self.system.ready is None or self.system.ready(self))), timeout)
        if not ready or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError('%s did not start; see %s' % (self.system.name, self.log_path))
        time.sleep(0.5)
        self.pids = self.process_ids()

    def stop(self):
        """Stop, then SIGKILL any of its processes that outlived the main one (seen with
        c-rabbitmq workers after an overload)."""
        super(BenchKamailio, self).stop()
        for pid in self.pids:
            try:
                with open('/proc/%d/cmdline' % pid, 'rb') as f:
                    if self.system.cfg.encode() in f.read():   # still ours, not a reused pid
                        os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        harness.wait_until(lambda: not sip_answers(0.1), 10)


def _pss_kb(pid):
    """PSS of one process in kB: each shared page divided among the processes mapping
    it, so summed over Kamailio's processes shared memory counts once."""
    with open('/proc/%d/smaps_rollup' % pid) as f:
        for line in f:
            if line.startswith('Pss:'):
                return int(line.split()[1])
    return 0


class MemorySampler(object):
    """Peaks of the summed RSS and PSS of Kamailio's processes, sampled every 0.5 s."""

    def __init__(self, kamailio):
        self.kamailio, self.peak_rss_kb, self.peak_pss_kb = kamailio, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            rss = self.kamailio.rss_kb()
            pss = self.kamailio._sum_over_processes(_pss_kb)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self._stop.wait(0.5)

    def stop(self):
        """(peak RSS, peak PSS) in MB."""
        self._stop.set()
        self._thread.join()
        return self.peak_rss_kb / 1024.0, self.peak_pss_kb / 1024.0


def sipp(user, rate, seconds):
    calls = int(rate * seconds)
    return calls, harness.run_sipp(harness.invite_scenario(user, 302), user, calls=calls,
                                   rate=rate, max_seconds=int(seconds * 3 + 30))


def measure(kamailio, user, rate, seconds):
    """One sipp run against a running Kamailio: what the tables need."""
    before = kamailio.cpu_ticks()
    calls, result = sipp(user, rate, seconds)
    cpu_s = (kamailio.cpu_ticks() - before) / float(TICK)
    answered = result.counts.get('302', 0)
    # A process that died took its CPU time with it: no figure rather than a wrong one.
    whole = kamailio.health() is None
    start = min(result.completed_ms) if result.completed_ms else 0
    return {'offered': rate, 'calls': calls, 'answered': answered, 'failed': calls - answered,
            'p50': result.percentile(50), 'p99': result.percentile(99),
            'cpu_us': cpu_s * 1e6 / answered if answered and whole else None,
            # (seconds since the first completed call, response ms) per answered call
            'series': [((t - start) / 1000.0, ms) for t, ms in
                       zip(result.completed_ms, result.response_ms)]}


class Bench(object):

    def __init__(self, args, logdir):
        self.args, self.logdir = args, logdir
        self.runs = collections.defaultdict(list)   # system -> every measurement
        self.trouble = collections.defaultdict(list)  # system -> health problems seen
        self.capped = set()                           # systems clean up to --search-max
        self._count = 0

    def session(self, system, work):
        """Fresh Kamailio for ``system``, warmed up; ``work(kamailio)``; health; stop.
        Returns what ``work`` returned, the peak (RSS, PSS) in MB and the health problem
        or None."""
        self._count += 1
        log = os.path.join(self.logdir, '%03d-%s.log' % (self._count, system.name))
        kamailio = BenchKamailio(log, system)
        kamailio.start()
        sampler = MemorySampler(kamailio)
        try:
            harness.run_sipp(harness.invite_scenario(system.user, 302), system.user,
                             calls=200, rate=100)
            out = work(kamailio)
            health = kamailio.health()
        finally:
            peak = sampler.stop()
            kamailio.stop()
        return out, peak, health and '%s (log %s)' % (health, log)

    def point(self, system, rate, seconds, phase):
        row, peak, health = self.session(
            system, lambda k: measure(k, system.user, rate, seconds))
        row.update(system=system.name, phase=phase, rss_mb=peak[0], pss_mb=peak[1],
                   healthy=health is None)
        if health:
            self.trouble[system.name].append(health)
        self.runs[system.name].append(row)
        print('%-10s %-8s %5d cps x %2ds: %5d/%5d answered, p50 %s p99 %s ms, %s us CPU/call, '
              'RSS %.0f MB, PSS %.0f MB%s' % (system.name, phase, rate, seconds, row['answered'],
                                             row['calls'], row['p50'], row['p99'],
                                             _fmt(row['cpu_us']), peak[0], peak[1],
                                             '' if health is None else ', UNHEALTHY: ' + health))
        sys.stdout.flush()
        return row

    def clean_rates(self, systems):
        """Per system: step up until a failure, then bisect; systems alternate per step."""
        a = self.args
        # per system: highest clean rate, lowest failing rate, next rate, bisections done
        state = {s.name: [None, None, a.search_start, 0] for s in systems}
        while any(st[2] for st in state.values()):
            for s in systems:
                st = state[s.name]
                if not st[2]:
                    continue
                row = self.point(s, st[2], a.search_seconds, 'search')
                if row['failed'] == 0 and row['healthy']:
                    st[0] = st[2]
                else:
                    st[1] = st[2]
                if st[1] is None:                       # still clean: step up
                    st[2] = int(round(st[0] * a.search_factor))
                    if st[2] > a.search_max:
                        st[2] = None
                        self.capped.add(s.name)
                elif st[0] is not None and st[3] < a.bisect and st[1] - st[0] > 20:
                    st[2], st[3] = (st[0] + st[1]) // 2, st[3] + 1
                else:
                    st[2] = None
        return {name: st[0] for name, st in state.items()}

    def overload(self, system, clean):
        """1.5x the clean rate for --seconds: the share of offered calls answered 302."""
        rate = int(round(1.5 * clean))
        row = self.point(system, rate, self.args.seconds, 'overload')
        return '%.0f%% (%d cps: %d/%d, p99 %s ms)' % (100.0 * row['answered'] / row['calls'],
                                                      rate, row['answered'], row['calls'],
                                                      _fmt(row['p99'], '%g'))

    def survival(self, system, clean, seconds):
        """3x the clean rate for ``seconds``, then health and a 200 cps, 5 s follow-up."""
        rate = 3 * clean

        def work(kamailio):
            over = measure(kamailio, system.user, rate, seconds)
            over.update(system=system.name, phase='survival')
            self.runs[system.name].append(over)
            alive = kamailio.health()
            after = measure(kamailio, system.user, 200, 5) if alive is None else None
            return over, alive, after
        (over, alive, after), peak, health = self.session(system, work)
        if alive or health:
            verdict = 'no: %s' % (alive or health)
        elif after['failed']:
            verdict = 'survived, not recovered (%d/%d at 200 cps)' % (after['answered'],
                                                                      after['calls'])
        else:
            verdict = 'yes, recovered'
        print('%-10s survival %5d cps x %2ds: %d/%d answered -> %s' % (
            system.name, rate, seconds, over['answered'], over['calls'], verdict))
        return '%s (%d cps: %d/%d answered)' % (verdict, rate, over['answered'], over['calls'])


def probe_sync_kazoo(logdir):
    """Start the sync kazoo_query config, send 5 INVITEs, say what became of Kamailio."""
    kamailio = BenchKamailio(os.path.join(logdir, 'c-kazoo-sync-probe.log'), SYNC_PROBE)
    try:
        kamailio.start()
    except RuntimeError as exc:
        return 'did not start: %s' % exc
    try:
        _, result = sipp(SYNC_PROBE.user, 5, 1)
        time.sleep(1)
        health = kamailio.health()
        log = kamailio.log()
    finally:
        kamailio.stop()
    crashed = 'signal 11' in log or 'segfault' in log
    answered = result.counts.get('302', 0)
    if health is None:
        return 'survived: %d/5 INVITEs answered 302' % answered
    return '%s: %d/5 answered; %s (log %s)' % (
        'crashed (segfault)' if crashed else 'unhealthy', answered, health, kamailio.log_path)


class HttpResponder(object):
    """bench/http_responder.py in a subprocess, on 127.0.0.1:HTTP_PORT."""

    def __init__(self, log_path):
        self.log_path, self.proc = log_path, None

    def start(self):
        if _http_answers():
            sys.exit('something already answers HTTP on 127.0.0.1:%d' % HTTP_PORT)
        self._log = open(self.log_path, 'a')
        self.proc = subprocess.Popen([harness.PYTHON, os.path.join(BENCH, 'http_responder.py'),
                                      '--port', str(HTTP_PORT)], cwd=harness.ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        if not harness.wait_until(_http_answers, 30):
            self.stop()
            sys.exit('bench/http_responder.py did not start; see %s' % self.log_path)

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def _http_answers():
    import urllib.request
    try:
        with urllib.request.urlopen('http://127.0.0.1:%d/route/probe' % HTTP_PORT,
                                    timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def sql_routes(users):
    """Table kg_bench_routes (username -> route) as the responder would answer, for
    ``users``, in the database of DB_URL (through psql)."""
    rows = ', '.join("('%s', 'sip:%s@127.0.0.1:5090')" % (u, u) for u in users)
    sql = ('CREATE TABLE IF NOT EXISTS kg_bench_routes (username text PRIMARY KEY, '
           'route text NOT NULL); INSERT INTO kg_bench_routes VALUES %s ON CONFLICT '
           '(username) DO UPDATE SET route = EXCLUDED.route;' % rows)
    out = subprocess.run(['psql', '-v', 'ON_ERROR_STOP=1', '-q', DB_URL, '-c', sql],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit('cannot create kg_bench_routes in %s: %s' % (DB_URL, out.stderr.strip()))


def declare_targeted():
    """Declare exchange ``targeted`` as Kazoo and the C module do (direct, neither durable
    nor auto-delete) before anything uses it, and stop with a clear message if it exists
    with other flags (kazoo_green once declared it auto-delete): the C module's own
    declaration would then fail (PRECONDITION_FAILED) and it would never get replies."""
    import amqp
    conn = amqp.Connection('127.0.0.1:5672', userid='guest', password='guest')
    conn.connect()
    try:
        channel = conn.channel()
        try:
            channel.exchange_declare('targeted', 'direct', durable=False, auto_delete=False)
        except amqp.exceptions.PreconditionFailed:
            sys.exit('exchange "targeted" exists with auto_delete=true: some kazoo_green '
                     'process still uses it; run again once it is gone')
    finally:
        conn.close()


def _fmt(value, spec='%.0f'):
    return '-' if value is None else spec % value


def _ratio(a, b):
    return '-' if not a or not b else '%.2f' % (float(a) / b)


def report(args, systems, clean, overload, survival, bench, probe, started, elapsed):
    ref = {s.name: next((r for r in bench.runs[s.name]
                         if r['phase'] == 'fixed' and r['offered'] == args.ref_rate), None)
           for s in systems}
    lines = ['# kazoo_green vs the C modules (bench/compare.py)', '',
             '%s, git %s, %s; %s s per fixed rate, search %s s per step; '
             'took %.1f min.' % (started.strftime('%Y-%m-%d %H:%M'), _git_rev(),
                                 ' '.join(sys.argv[1:]) or 'defaults', args.seconds,
                                 args.search_seconds, elapsed / 60.0), '']
    head = ['system'] + ['%d cps answered / failed' % r for r in args.rates] + [
        'highest clean cps', 'p50 / p99 ms @%d' % args.ref_rate,
        'CPU µs/call @%d' % args.ref_rate, 'peak RSS / PSS MB', 'survived all runs',
        '1.5x clean rate: answered', '3x clean rate for %d s' % args.survival_seconds]
    lines += ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for s in systems:
        runs = bench.runs[s.name]
        cells = [s.name]
        for rate in args.rates:
            r = next((x for x in runs if x['phase'] == 'fixed' and x['offered'] == rate), None)
            cells.append('%d / %d' % (r['answered'], r['failed']) if r else '-')
        r = ref[s.name]
        cells += [('>= %d' if s.name in bench.capped else '%d') % clean[s.name]
                  if clean.get(s.name) else
                  ('< %d' % args.search_start if s.name in clean else '-'),
                  '%s / %s' % (_fmt(r and r['p50'], '%g'), _fmt(r and r['p99'], '%g')),
                  _fmt(r and r['cpu_us']),
                  '%s / %s' % (_fmt(max([x['rss_mb'] for x in runs if 'rss_mb' in x] or
                                        [None])),
                               _fmt(max([x['pss_mb'] for x in runs if 'pss_mb' in x] or
                                        [None]))),
                  'yes' if not bench.trouble[s.name] else 'NO: ' + '; '.join(
                      bench.trouble[s.name]),
                  overload.get(s.name, 'not run'), survival.get(s.name, 'not run')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    if 'c-kazoo' in ref:
        base = ref['c-kazoo']
        lines += ['', 'Ratios against c-kazoo (clean rate: higher is better; CPU and p99: '
                  'lower is better):', '',
                  '| system | clean rate ratio | CPU ratio @%d | p99 ratio @%d |'
                  % (args.ref_rate, args.ref_rate), '|---|---|---|---|']
        for s in systems:
            r = ref[s.name]
            lines.append('| %s | %s | %s | %s |' % (
                s.name, _ratio(clean.get(s.name), clean.get('c-kazoo')),
                _ratio(r and r['cpu_us'], base and base['cpu_us']),
                _ratio(r and r['p99'], base and base['p99'])))
    pairs = [(t, t.replace('-tls', '-tcp')) for t in ref if t.endswith('-tls')
             and t.replace('-tls', '-tcp') in ref]
    if pairs:
        lines += ['', 'TLS against plain TCP to the same broker node:', '',
                  '| systems | CPU µs/call @%d TLS / TCP | ratio | p99 ms @%d TLS / TCP |'
                  % (args.ref_rate, args.ref_rate), '|---|---|---|---|']
        for tls, tcp in pairs:
            a, b = ref[tls], ref[tcp]
            lines.append('| %s / %s | %s / %s | %s | %s / %s |' % (
                tls, tcp, _fmt(a and a['cpu_us']), _fmt(b and b['cpu_us']),
                _ratio(a and a['cpu_us'], b and b['cpu_us']), _fmt(a and a['p99'], '%g'),
                _fmt(b and b['p99'], '%g')))
    if probe:
        lines += ['', 'C kazoo module, sync `kazoo_query` probe (bench/systems/c_kazoo_sync.cfg):'
                  ' %s' % probe]
    lines += ['', 'RSS and PSS are summed over Kamailio\'s processes: RSS counts shared memory '
              'in every process that touched it, PSS shares it out (counts it once). '
              'Logs: %s' % bench.logdir]
    return '\n'.join(lines) + '\n'


def _git_rev():
    out = subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=harness.ROOT,
                         capture_output=True, text=True)
    return out.stdout.strip() or '?'


def plot(path, args, systems, bench):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('no plot: matplotlib missing (.venv/bin/pip install -r bench/requirements.txt)')
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for s in systems:
        points = sorted((r['offered'], r['answered'] / float(r['calls']) * r['offered'])
                        for r in bench.runs[s.name] if r['phase'] in ('fixed', 'search'))
        if points:
            left.plot([p[0] for p in points], [p[1] for p in points], marker='o', label=s.name)
    top = max([r['offered'] for runs in bench.runs.values() for r in runs] or [1])
    left.plot([0, top], [0, top], color='grey', linestyle=':', label='all answered')
    left.set(xlabel='offered calls/s', ylabel='answered (302) calls/s',
             title='Throughput (fixed rates %d s, search steps %d s)'
             % (args.seconds, args.search_seconds))
    left.legend()
    names, cpu = [], []
    for s in systems:
        r = next((x for x in bench.runs[s.name]
                  if x['phase'] == 'fixed' and x['offered'] == args.ref_rate), None)
        names.append(s.name)
        cpu.append(r['cpu_us'] if r and r['cpu_us'] else 0)
    bars = right.bar(names, cpu, color='tab:blue')
    right.bar_label(bars, fmt='%.0f')
    right.set(ylabel='Kamailio CPU µs per answered call',
              title='CPU per call at %d cps offered' % args.ref_rate)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _per_second_p99(series):
    buckets = collections.defaultdict(list)
    for t, ms in series:
        buckets[int(t)].append(ms)
    seconds = sorted(buckets)
    return [s + 0.5 for s in seconds], [
        sorted(buckets[s])[int(round(0.99 * (len(buckets[s]) - 1)))] for s in seconds]


def plot_latency(path, args, systems, bench):
    """Per system, every answered call's response time against when it completed: at
    the reference rate and, where it ran, during the 3x-clean-rate survival run."""
    import matplotlib.pyplot as plt
    phases = [('fixed', args.ref_rate, '%d cps offered, %d s' % (args.ref_rate, args.seconds))]
    if any(r['phase'] == 'survival' for runs in bench.runs.values() for r in runs):
        phases.append(('survival', None, '3x the clean rate, %d s' % args.survival_seconds))
    fig, axes = plt.subplots(len(systems), len(phases), squeeze=False, sharey=True,
                             figsize=(6.5 * len(phases), 2.2 * len(systems) + 0.6))
    for row, s in enumerate(systems):
        for col, (phase, rate, title) in enumerate(phases):
            ax = axes[row][col]
            r = next((x for x in bench.runs[s.name] if x['phase'] == phase
                      and (rate is None or x['offered'] == rate)), None)
            if not r or not r.get('series'):
                ax.text(0.5, 0.5, 'not run' if not r else 'nothing answered',
                        transform=ax.transAxes, ha='center')
            else:
                ax.scatter([p[0] for p in r['series']], [max(p[1], 0.1) for p in r['series']],
                           s=1, alpha=0.3, color='tab:blue', rasterized=True)
                x, y = _per_second_p99(r['series'])
                ax.plot(x, [max(v, 0.1) for v in y], color='tab:red', label='p99 per second')
                ax.set_title('%s, %s: %d/%d answered (%d offered cps)' % (
                    s.name, title, r['answered'], r['calls'], r['offered']), fontsize=9)
            ax.set_yscale('log')
            ax.set_ylabel('response ms')
            if row == len(systems) - 1:
                ax.set_xlabel('seconds since the first answer')
    axes[0][0].legend(loc='upper right', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--systems', default=','.join(SYSTEMS),
                   help='comma-separated subset of: %s (default: the first nine)'
                   % ', '.join(ALL_SYSTEMS))
    p.add_argument('--rates', help='fixed offered rates, cps (default 500,1000,2000)')
    p.add_argument('--seconds', type=int, help='seconds per fixed rate (default 10)')
    p.add_argument('--ref-rate', type=int, help='rate of the p50/p99/CPU columns '
                   '(default 1000; must be one of --rates)')
    p.add_argument('--search-start', type=int, default=500)
    p.add_argument('--search-factor', type=float, help='step-up factor (default 1.25)')
    p.add_argument('--search-seconds', type=int, help='seconds per search step (default 5)')
    p.add_argument('--search-max', type=int, default=8000, help='stop stepping up here')
    p.add_argument('--bisect', type=int, help='bisection steps after the first failure '
                   '(default 2)')
    p.add_argument('--survival', default='kg-sync,kg-async',
                   help='systems for the 1.5x overload and 3x-saturation tests: a list, '
                        '"all" or "none"')
    p.add_argument('--survival-seconds', type=int, help='default 30')
    p.add_argument('--no-search', action='store_true', help='skip the clean-rate search '
                   '(and so the survival test)')
    p.add_argument('--quick', action='store_true',
                   help='rates 500,1000, 5 s each, search x1.5 for 3 s a step with one '
                        'bisection, survival 10 s: a few minutes')
    args = p.parse_args()
    quick = args.quick
    defaults = dict(rates='500,1000' if quick else '500,1000,2000', seconds=5 if quick else 10,
                    ref_rate=1000, search_factor=1.5 if quick else 1.25,
                    search_seconds=3 if quick else 5, bisect=1 if quick else 2,
                    survival_seconds=10 if quick else 30)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.rates = [int(r) for r in str(args.rates).split(',')]
    if args.ref_rate not in args.rates:
        p.error('--ref-rate %d is not one of --rates' % args.ref_rate)
    unknown = set(args.systems.split(',')) - set(ALL_SYSTEMS)
    if unknown:
        p.error('unknown system(s): %s' % ', '.join(sorted(unknown)))
    if any(name.endswith('-base') for name in args.systems.split(',')) and not (
            BASE and os.path.isfile(BASE_ENV['KAZOO_GREEN_ROUTER'])):
        p.error('the -base systems need KG_BENCH_BASE: a checkout of kazoo_green')
    return args


def main():
    args = parse_args()
    systems = [ALL_SYSTEMS[name] for name in args.systems.split(',')]
    missing = sorted({s.module for s in systems if s.module and not os.path.exists(
        os.path.join(MODULES_DIR, s.module + '.so'))})
    if missing:
        sys.exit('Kamailio module(s) %s missing: run `bash tests/tools/services.sh --bench`'
                 % ', '.join(missing))
    started, t0 = datetime.datetime.now(), time.monotonic()
    logdir = tempfile.mkdtemp(prefix='kg-compare-')
    declare_targeted()
    responder = harness.Responder(os.path.join(logdir, 'responder.log'))
    responder.start()
    responders = [responder]
    if any(s.broker for s in systems):   # a responder on the TLS node too
        responders.append(harness.Responder(os.path.join(logdir, 'responder-tls-node.log'),
                                            env=TLSNodeBroker.env(False),
                                            queues=TLSNodeBroker.queues))
        responders[-1].start()
    if SYSTEMS['http-async'] in systems:
        responders.append(HttpResponder(os.path.join(logdir, 'http-responder.log')))
        responders[-1].start()
    if SYSTEMS['sql'] in systems:
        sql_routes([s.user for s in systems if s is SYSTEMS['sql']])
    bench = Bench(args, logdir)
    clean, overload, survival, probe = {}, {}, {}, None
    try:
        if SYSTEMS['c-kazoo'] in systems:
            probe = probe_sync_kazoo(logdir)
            print('c-kazoo-sync probe: %s' % probe)
        for rate in args.rates:
            for s in systems:
                bench.point(s, rate, args.seconds, 'fixed')
        if not args.no_search:
            clean = bench.clean_rates(systems)
            chosen = {'all': [s.name for s in systems], 'none': []}.get(
                args.survival, args.survival.split(','))
            for s in systems:
                if s.name in chosen:
                    if clean.get(s.name):
                        overload[s.name] = bench.overload(s, clean[s.name])
                        survival[s.name] = bench.survival(s, clean[s.name],
                                                          args.survival_seconds)
                    else:
                        overload[s.name] = survival[s.name] = 'no clean rate to start from'
    finally:
        for r in responders:
            r.stop()
        TLSNodeBroker.stop()
    elapsed = time.monotonic() - t0
    table = report(args, systems, clean, overload, survival, bench, probe, started, elapsed)
    print('\n' + table)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stem = os.path.join(RESULTS_DIR, 'compare-%s' % started.strftime('%Y%m%d-%H%M%S'))
    png = plot(stem + '.png', args, systems, bench)
    if png:
        lat = plot_latency(stem + '-latency.png', args, systems, bench)
        table += '\n![throughput and CPU per call](%s)\n' % os.path.basename(png)
        table += '\n![response time over time](%s)\n' % os.path.basename(lat)
    with open(stem + '.md', 'w') as f:
        f.write(table)
    print('written: %s.md%s (took %.1f min)' % (stem, ', .png and -latency.png' if png else '',
                                                 elapsed / 60))


if __name__ == '__main__':
    main()
