"""REGISTERs with digest auth through the Kazoo node example: the highest rate with zero
failures, Kamailio's CPU per registration, p50/p99 -- answered by Kazoo (an async
``authn_req`` per REGISTER: ``KAZOO_NODE_AUTH_CACHE=0``) and from the auth cache.

For each of the two, one Kamailio (examples/kazoo-node, 4 SIP workers) and, for the
whole run, one examples/fake_kazoo.py on the local RabbitMQ. Each step: ``--seconds`` of
REGISTERs at a rate (each a sipp call: REGISTER, 401, REGISTER with credentials, 200;
one user, ``kgbench``, as sipp's digest takes its user from the command line). The rate
doubles from ``--start`` while a step had no failure, then the interval between the last
clean and the first failing rate is halved ``--refine`` times. A failure: any REGISTER
not answered 200 (a 503 when the query timed out, a timeout).

    .venv/bin/python bench/register.py [--start 100] [--seconds 5] [--max 6400]

Response time: sipp's, from the first REGISTER to the 200 (two round trips), in whole
ms. CPU: utime + stime of every Kamailio process over the step, per registration; and
net of what Kamailio spends idle (measured for 5 s before the steps: its timers and
the consumer processes' loops). Needs what the e2e
tests need (``bash tests/tools/services.sh``). Numbers vary up to 3x between machines of
this kind: compare only figures of one run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.e2e import harness  # noqa: E402
from tests.e2e import kazoo_node_sipp as scen  # noqa: E402

CFG = os.path.join(ROOT, 'examples', 'kazoo-node', 'kamailio.cfg')
FAKE = os.path.join(ROOT, 'examples', 'fake_kazoo.py')
PASSWORD = 'bench-secret'
TICK = os.sysconf('SC_CLK_TCK')
BROKER = 'amqp://guest:guest@127.0.0.1:5672//'


USER = 'kgbench'


def idle_ticks_per_second(kamailio, seconds=5.0):
    """Kamailio's CPU while nothing comes in (its timers, the consumer processes' loops)."""
    before, started = kamailio.cpu_ticks(), time.monotonic()
    time.sleep(seconds)
    return (kamailio.cpu_ticks() - before) / (time.monotonic() - started)


def step(kamailio, rate, seconds, idle=0.0):
    calls = rate * seconds
    before, started = kamailio.cpu_ticks(), time.monotonic()
    result = scen.Sipp(scen.register('200'), service=USER, user=USER, password=PASSWORD,
                       calls=calls, rate=rate, max_seconds=seconds * 6 + 30).wait()
    ticks = kamailio.cpu_ticks() - before
    elapsed = time.monotonic() - started
    answered = result.counts.get('200', 0)
    return {'rate': rate, 'calls': calls, 'ok': result.successful,
            'failed': calls - result.successful,
            'cpu_us': ticks * 1e6 / TICK / max(1, answered),
            'net_us': (ticks - idle * elapsed) * 1e6 / TICK / max(1, answered),
            'p50': result.percentile(50), 'p99': result.percentile(99)}


def search(kamailio, args, label):
    step(kamailio, 50, 2)   # warm: imports, connections, caches
    idle = idle_ticks_per_second(kamailio)
    print('%-5s idle: %.0f ms CPU per second' % (label, idle * 1000.0 / TICK), flush=True)
    clean, failing, rate, rows = None, None, args.start, []

    def run(rate):
        row = step(kamailio, rate, args.seconds, idle)
        row['kind'] = label
        rows.append(row)
        print_row(row)
        return not row['failed']

    while rate <= args.max:
        if not run(rate):
            failing = rate
            break
        clean = rate
        rate *= 2
    for _ in range(args.refine if clean and failing else 0):
        rate = (clean + failing) // 2
        if rate in (clean, failing):
            break
        if run(rate):
            clean = rate
        else:
            failing = rate
    return clean, rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--start', type=int, default=100)
    parser.add_argument('--seconds', type=int, default=5)
    parser.add_argument('--max', type=int, default=6400)
    parser.add_argument('--refine', type=int, default=2)
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix='kg-register-bench-')
    fake_log = open(os.path.join(workdir, 'fake_kazoo.log'), 'w')
    fake = subprocess.Popen([harness.PYTHON, FAKE, '--broker', BROKER, 'serve', '--quiet',
                             '--user', '%s:%s@%s' % (USER, PASSWORD, scen.DOMAIN)],
                            cwd=ROOT, stdout=fake_log, stderr=subprocess.STDOUT)
    results = []
    try:
        if not harness.wait_until(lambda: harness.rabbit_queues().get(
                'fake-kazoo-authn', (0, 0))[0] >= 1, 30):
            sys.exit('fake Kazoo did not start; see %s' % workdir)
        for label, cache in (('kazoo', '0'), ('cache', '1')):
            kamailio = harness.Kamailio(
                os.path.join(workdir, 'kamailio-%s.log' % label), cfg=CFG,
                node='kamailio@kg-register-bench',
                env={'KAZOO_NODE_DB': os.path.join(workdir, 'node-%s.sqlite' % label),
                     'KAZOO_GREEN_HTTP_PORT': '5082', 'KAZOO_NODE_AUTH_CACHE': cache})
            kamailio.start()
            try:
                clean, rows = search(kamailio, args, label)
                problem = kamailio.health()
            finally:
                kamailio.stop()
            results.append((label, clean, rows, problem))
    finally:
        fake.terminate()
        fake.wait(10)
    print()
    for label, clean, rows, problem in results:
        at = [r for r in rows if r['rate'] == clean]
        print('%-5s highest clean rate %s REGISTER/s (%d s steps)%s; Kamailio %s' % (
            label, clean, args.seconds,
            ': %.0f us CPU/registration (%.0f net of idle), p50 %s ms, p99 %s ms there' % (
                at[0]['cpu_us'], at[0]['net_us'], _ms(at[0]['p50']), _ms(at[0]['p99']))
            if at else '',
            problem or 'kept all its processes'))
    print('logs: %s' % workdir)
    return 0


def print_row(r):
    print('%-5s %5d/s  %6d ok %5d failed  %6.0f us CPU/registration (%4.0f net of idle)  '
          'p50 %s ms  p99 %s ms' % (r['kind'], r['rate'], r['ok'], r['failed'], r['cpu_us'],
                                    r['net_us'], _ms(r['p50']), _ms(r['p99'])), flush=True)


def _ms(value):
    return '-' if value is None else '%.0f' % value


if __name__ == '__main__':
    sys.exit(main())
