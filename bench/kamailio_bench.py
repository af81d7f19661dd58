"""Kamailio CPU per call for the example (sync and async INVITE -> route.req -> 302).

Starts examples/responder.py and Kamailio with examples/kamailio/kamailio.cfg (as the
end-to-end tests do), drives sipp at a fixed offered rate and prints, per mode:
answered calls, failures, p50/p99 response time and Kamailio CPU µs per call (utime +
stime of every Kamailio process over the run, from /proc, divided by answered calls).
A script that prints numbers, not a test. Needs the local RabbitMQ, Kamailio and sipp
(`bash tests/tools/services.sh`).

    .venv/bin/python bench/kamailio_bench.py [--rate 1000] [--seconds 10] [--runs 2]
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kazoo_green  # noqa: E402,F401  (gevent patching for the harness' subprocesses)
from tests.e2e import harness  # noqa: E402

TICK = os.sysconf('SC_CLK_TCK')


def measure(kamailio, user, rate, seconds):
    calls = rate * seconds
    before = kamailio.cpu_ticks()
    started = time.monotonic()
    result = harness.run_sipp(harness.invite_scenario(user, 302), user, calls=calls,
                              rate=rate, max_seconds=seconds * 3 + 30)
    elapsed = time.monotonic() - started
    cpu_s = (kamailio.cpu_ticks() - before) / float(TICK)
    answered = result.counts.get('302', 0)
    return {
        'mode': 'async' if user.startswith('async') else 'sync',
        'offered_cps': rate, 'calls': calls, 'answered': answered,
        'failed': calls - answered, 'p50_ms': result.percentile(50),
        'p99_ms': result.percentile(99), 'wall_s': elapsed,
        'cpu_us_per_call': cpu_s * 1e6 / answered if answered else float('nan'),
        'rss_mb': kamailio.rss_kb() / 1024.0, 'healthy': kamailio.health() is None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rate', type=int, default=1000, help='offered calls per second')
    parser.add_argument('--seconds', type=int, default=10)
    parser.add_argument('--runs', type=int, default=2, help='alternating sync/async runs')
    args = parser.parse_args()

    logdir = tempfile.mkdtemp(prefix='kg-bench-')
    responder = harness.Responder(os.path.join(logdir, 'responder.log'))
    kamailio = harness.Kamailio(os.path.join(logdir, 'kamailio.log'),
                                node='kamailio@kg-bench')
    responder.start()
    kamailio.start()
    rows = []
    try:
        for user in ('warmup', 'asyncwarmup'):  # connections made, caches warm
            harness.run_sipp(harness.invite_scenario(user, 302), user, calls=200, rate=100)
        for _ in range(args.runs):
            for user in ('benchuser', 'asyncbenchuser'):
                row = measure(kamailio, user, args.rate, args.seconds)
                rows.append(row)
                print('%(mode)-5s %(offered_cps)5d cps: answered %(answered)d/%(calls)d, '
                      'p50 %(p50_ms)s ms, p99 %(p99_ms)s ms, %(cpu_us_per_call).0f us CPU/call'
                      % row)
                sys.stdout.flush()
    finally:
        kamailio.stop()
        responder.stop()
    print()
    print('| mode | offered cps | answered | failed | p50 ms | p99 ms | Kamailio CPU µs/call '
          '| RSS MB | survived |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print('| %(mode)s | %(offered_cps)d | %(answered)d | %(failed)d | %(p50_ms)s | '
              '%(p99_ms)s | %(cpu_us_per_call).0f | %(rss_mb).0f | %(healthy)s |' % r)
    print('\nlogs: %s' % logdir)


if __name__ == '__main__':
    main()
