"""Two systems of bench/compare.py, alternated run by run, for a difference smaller than
one run's spread (what kazoo_green's statistics cost: kg-sync against kg-sync-nostats).

Each run: a fresh Kamailio of the system, warmed up with 200 calls at 100 cps, then
``--seconds`` of sipp at ``--rate`` cps; the Kamailio CPU (utime+stime) per answered call
split by process kind (each run's row also gives the kernel's part, ``<kind>_sys``) as
``kamcmd core.psx`` names them: SIP workers (udp receivers), the
consumer processes (kg's rtimers, the C kazoo module's AMQP processes, http_async_client's
and the core async workers: see RESUMERS) and the rest. Runs alternate A B B A A B ..., so a drift of
the machine falls on both. Prints every run, then per system the mean and standard
deviation, and the difference of the means with its standard error.

    .venv/bin/python bench/ab.py kg-sync kg-sync-nostats [--runs 8] [--rate 1000]
        [--seconds 8]

Needs what compare.py needs (``bash tests/tools/services.sh --bench``).
"""

import argparse
import collections
import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare  # noqa: E402  (bench/compare.py: the systems, Kamailio, sipp)
from compare import ALL_SYSTEMS, CTL, TICK, harness  # noqa: E402

KINDS = ('workers', 'consumer', 'rest')
#: What core.psx calls the processes that resume suspended transactions (or, for the
#: C kazoo module, publish and consume for the SIP workers): kg's rtimer processes, the
#: C kazoo module's AMQP processes, http_async_client's and the core async workers.
RESUMERS = ('rtimer', 'amqp', 'http async worker', 'async task worker')


def _ticks(pid):
    """(utime + stime, stime) of ``pid``, in clock ticks."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[12])


def process_kinds():
    """{pid: kind} from the running Kamailio's ``core.psx``."""
    out = subprocess.run(['kamcmd', '-s', CTL, 'core.psx'], capture_output=True, text=True,
                         timeout=10).stdout
    kinds, pid = {}, None
    for line in out.splitlines():
        key, _, value = line.strip().partition(':')
        if key == 'PID':
            pid = int(value)
        elif key == 'DSC' and pid is not None:
            value = value.lower()
            kinds[pid] = ('workers' if 'udp receiver' in value else
                          'consumer' if any(k in value for k in RESUMERS) else 'rest')
    return kinds


def run(system, rate, seconds, logdir, n):
    kamailio = compare.BenchKamailio(os.path.join(logdir, '%03d-%s.log' % (n, system.name)),
                                     system)
    kamailio.start()
    try:
        harness.run_sipp(harness.invite_scenario(system.user, 302), system.user, calls=200,
                         rate=100)
        kinds = process_kinds()
        before = {pid: _ticks(pid) for pid in kamailio.pids}
        calls, result = compare.sipp(system.user, rate, seconds)
        after = {pid: _ticks(pid) for pid in kamailio.pids}
        health = kamailio.health()
    finally:
        kamailio.stop()
    answered = result.counts.get('302', 0)
    cpu, system_cpu = collections.Counter(), collections.Counter()
    for pid in kamailio.pids:
        kind = kinds.get(pid, 'rest')
        cpu[kind] += after[pid][0] - before[pid][0]
        system_cpu[kind + '_sys'] += after[pid][1] - before[pid][1]
    # Per kind its whole CPU, and (``<kind>_sys``) the kernel's part of it.
    per_call = {k: (c[k] / float(TICK) * 1e6 / answered if answered else None)
                for c, names in ((cpu, KINDS), (system_cpu, [k + '_sys' for k in KINDS]))
                for k in names}
    total = sum(per_call[k] for k in KINDS if per_call[k] is not None) if answered else None
    return dict(system=system.name, calls=calls, answered=answered, total=total,
                p99=result.percentile(99), healthy=health is None, **per_call)


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('a', choices=sorted(ALL_SYSTEMS))
    p.add_argument('b', choices=sorted(ALL_SYSTEMS))
    p.add_argument('--runs', type=int, default=8, help='runs per system (default 8)')
    p.add_argument('--rate', type=int, default=1000, help='offered cps (default 1000)')
    p.add_argument('--seconds', type=float, default=8, help='per run (default 8)')
    args = p.parse_args()
    if any(name.endswith('-base') for name in (args.a, args.b)) and not (
            compare.BASE and os.path.isfile(compare.BASE_ENV['KAZOO_GREEN_ROUTER'])):
        p.error('the -base systems need KG_BENCH_BASE: a checkout of kazoo_green')
    systems = [ALL_SYSTEMS[args.a], ALL_SYSTEMS[args.b]]
    logdir = tempfile.mkdtemp(prefix='kg-ab-')
    compare.declare_targeted()
    responder = harness.Responder(os.path.join(logdir, 'responder.log'))
    responder.start()
    rows = collections.defaultdict(list)
    try:
        n = 0
        for i in range(args.runs):
            for system in (systems if i % 2 == 0 else systems[::-1]):
                n += 1
                row = run(system, args.rate, args.seconds, logdir, n)
                rows[system.name].append(row)
                print(json.dumps(row, default=lambda v: round(v, 1)), flush=True)
    finally:
        responder.stop()
    print('\n%d runs each, %d cps x %gs; Kamailio CPU us per answered call, mean +- sd'
          % (args.runs, args.rate, args.seconds))
    means = {}
    for name in (args.a, args.b):
        cells = []
        for k in ('total',) + KINDS:
            mean, sd = _mean_sd([r[k] for r in rows[name]])
            means[name, k] = mean, sd
            cells.append('%s %s' % (k, 'n/a' if mean is None else '%.0f +- %.0f' % (
                mean, sd or 0)))
        failed = sum(r['calls'] - r['answered'] for r in rows[name])
        print('%-18s %s; failed calls %d' % (name, ', '.join(cells), failed))
    for k in ('total', 'workers', 'consumer'):
        (ma, sa), (mb, sb) = means[args.a, k], means[args.b, k]
        if ma is None or mb is None:
            continue
        se = math.sqrt(((sa or 0) ** 2 + (sb or 0) ** 2) / args.runs)
        print('%s - %s, %s: %+.1f us (%+.1f%%), standard error %.1f us'
              % (args.a, args.b, k, ma - mb, 100.0 * (ma - mb) / mb if mb else 0, se))
    print('logs: %s' % logdir)


if __name__ == '__main__':
    main()
