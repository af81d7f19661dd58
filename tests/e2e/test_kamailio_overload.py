"""Async admission in a real Kamailio: the shared shed share crosses the fork, and a shed
call is answered at once with a stateless 503 (examples/kamailio/router.py).

The example runs with KAZOO_GREEN_SHED_LAG=0.0002: no reply through RabbitMQ and the
Python responder comes back within 0.2 ms, so every interval with replies counts as a
standing queue and the share climbs, then falls back in the quiet it makes; a steady
load thus gets both 302s and immediate 503s.
"""

from ..conftest import unique, wait_for
from . import harness


def test_async_queries_are_shed_with_a_stateless_503_while_replies_lag(logdir):
    node = 'kamailio@kgtest-%s' % unique('shed')
    with harness.example(logdir, node, env={'KAZOO_GREEN_SHED_LAG': '0.0002'}) as k:
        before = k.statistics()
        result = harness.run_sipp(harness.invite_scenario('asyncshed', 302, 503),
                                  'asyncshed', calls=600, rate=200)
        print('\nshed: %r' % result)
        assert result.returncode == 0 and result.failed == 0, result
        answered, shed = result.counts.get('302', 0), result.counts.get('503', 0)
        assert answered + shed == 600 and answered > 0 and shed > 0, result.counts
        grown = lambda name: k.statistics()[name] - before[name]  # noqa: E731
        # Every 503 was a refusal in a SIP worker (counted there, summed over processes),
        # every 302 a query; nothing timed out.
        assert wait_for(lambda: grown('async_shed') == shed and
                        grown('queries_ok') == answered, 10), (grown('async_shed'), shed)
        assert grown('queries') == answered and grown('queries_timeout') == 0
        assert k.health() is None, k.health()
    harness.subprocess.run(['rabbitmqctl', '-q', 'delete_queue', '%s-resume' % node],
                           capture_output=True)
