"""Where each system's Kamailio CPU goes, by process kind and by code: ``perf`` sampled
(``cpu-clock``, 1000 Hz, every Kamailio process) in the middle of a steady sipp run of a
bench/compare.py system.

Per system, µs of CPU per offered call, by process kind (as bench/ab.py: SIP workers,
consumer/resuming processes, the rest) and by what ran:

    python     the interpreter and extension modules (libpython, *.cpython-*.so, greenlet,
               app_python3: the KEMI glue)
    kernel     system calls, the network stack, scheduling
    kamailio   Kamailio's core and its C modules (tm, sl, pv, ...), json-c, libevent,
               librabbitmq, libc (the C kazoo/rabbitmq modules' AMQP code is here too:
               ``c-amqp`` shows kazoo.so + librabbitmq + json-c + libevent alone)

so the cost of routes and AMQP client code in Python can be set against the C modules'
for the same calls (``floor-async`` shows what the Python routes alone cost). The figures
are perf's samples (1 ms each) over the calls offered meanwhile; ``proc`` is utime+stime
of the same processes over the same window, for a check (perf's own cost shows there).

    .venv/bin/python bench/cpu_split.py [--systems kg-async,c-kazoo,floor-async]
        [--rate 1000] [--seconds 10] [--warmup 5]

Needs ``perf`` (Debian package linux-perf, perf_event_paranoid <= 2 for one's own
processes: root here) and what compare.py needs (``bash tests/tools/services.sh --bench``).
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ab  # noqa: E402  (bench/ab.py: process kinds, CPU ticks)
import compare  # noqa: E402
from compare import ALL_SYSTEMS, TICK, harness  # noqa: E402

GROUPS = ('python', 'kernel', 'kamailio')
C_AMQP = re.compile(r'^(kazoo\.so|rabbitmq\.so|librabbitmq|libjson-c|libevent)')


def group_of(dso):
    """(group, whether it is C AMQP/JSON code) of a perf dso name."""
    if dso.startswith('[kernel') or dso == '[vdso]':
        return 'kernel', False
    if (dso.startswith(('libpython', 'app_python', '_greenlet', 'python'))
            or '.cpython-' in dso):
        return 'python', False
    return 'kamailio', bool(C_AMQP.match(dso))


def samples_by_pid_dso(data):
    """{(pid, dso): samples} of a perf.data file."""
    out = subprocess.run(['perf', 'report', '-i', data, '--stdio', '--no-children', '-g',
                          'none', '-n', '--sort', 'pid,dso'], capture_output=True, text=True,
                         check=True).stdout
    found = collections.Counter()
    for line in out.splitlines():
        m = re.match(r'\s*[\d.]+%\s+(\d+)\s+(\d+):\S+\s+(\S.*?)\s*$', line)
        if m:
            found[int(m.group(2)), m.group(3)] += int(m.group(1))
    return found


def split(system, rate, seconds, warmup, logdir):
    kamailio = compare.BenchKamailio(os.path.join(logdir, '%s.log' % system.name), system)
    kamailio.start()
    try:
        harness.run_sipp(harness.invite_scenario(system.user, 302), system.user, calls=200,
                         rate=100)
        kinds = ab.process_kinds()
        load = threading.Thread(target=compare.sipp,
                                args=(system.user, rate, warmup + seconds + warmup))
        load.start()
        time.sleep(warmup)
        data = os.path.join(logdir, '%s.perf.data' % system.name)
        pids = ','.join(str(p) for p in kamailio.pids)
        before = {pid: ab._ticks(pid)[0] for pid in kamailio.pids}
        subprocess.run(['perf', 'record', '-q', '-e', 'cpu-clock', '-F', '1000', '-p', pids,
                        '-o', data, '--', 'sleep', str(seconds)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        after = {pid: ab._ticks(pid)[0] for pid in kamailio.pids}
        load.join()
        health = kamailio.health()
    finally:
        kamailio.stop()
    calls = float(rate * seconds)
    table = collections.Counter()
    for (pid, dso), n in samples_by_pid_dso(data).items():
        kind = kinds.get(pid, 'rest')
        group, c_amqp = group_of(dso)
        table[kind, group] += n
        if c_amqp:
            table[kind, 'c-amqp'] += n
    per_call = {k: v * 1000.0 / calls for k, v in table.items()}   # 1 sample = 1000 µs
    proc = collections.Counter()
    for pid in kamailio.pids:
        proc[kinds.get(pid, 'rest')] += (after[pid] - before[pid]) / float(TICK) * 1e6 / calls
    return per_call, proc, health


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--systems', default='kg-async,c-kazoo,floor-async')
    p.add_argument('--rate', type=int, default=1000)
    p.add_argument('--seconds', type=int, default=10, help='perf sampling time')
    p.add_argument('--warmup', type=int, default=5, help='load before and after sampling')
    args = p.parse_args()
    if shutil.which('perf') is None:
        sys.exit('cpu_split.py: perf is not installed (Debian: apt-get install linux-perf)')
    names = args.systems.split(',')
    unknown = [n for n in names if n not in ALL_SYSTEMS]
    if unknown:
        sys.exit('unknown systems: %s (known: %s)' % (', '.join(unknown),
                                                       ', '.join(ALL_SYSTEMS)))
    logdir = tempfile.mkdtemp(prefix='kg-cpusplit-')
    compare.declare_targeted()
    responder = harness.Responder(os.path.join(logdir, 'responder.log'))
    responder.start()
    try:
        results = [(n, split(ALL_SYSTEMS[n], args.rate, args.seconds, args.warmup, logdir))
                   for n in names]
    finally:
        responder.stop()
    print('\n%d cps, perf over %d s; CPU us per offered call' % (args.rate, args.seconds))
    print('| system | process kind | python | kernel | kamailio (of it: C AMQP+JSON) '
          '| all (perf) | all (/proc) |')
    print('|---|---|---|---|---|---|---|')
    for name, (per_call, proc, health) in results:
        for kind in ab.KINDS + ('all',):
            kinds = ab.KINDS if kind == 'all' else (kind,)
            cell = {g: sum(per_call.get((k, g), 0.0) for k in kinds)
                    for g in GROUPS + ('c-amqp',)}
            print('| %s | %s | %.0f | %.0f | %.0f (%.0f) | %.0f | %.0f |' % (
                name, kind, cell['python'], cell['kernel'], cell['kamailio'], cell['c-amqp'],
                sum(cell[g] for g in GROUPS), sum(proc[k] for k in kinds)))
        if health:
            print('| %s | UNHEALTHY: %s |' % (name, health))
    print('logs and perf data: %s' % logdir)


if __name__ == '__main__':
    main()
