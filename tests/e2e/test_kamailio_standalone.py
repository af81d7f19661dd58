"""The Kamailio example on a zone of two standalone (unclustered) brokers, as Kazoo often
runs them: real Kamailio + app_python3, the example responder, sipp.

Kamailio and the responder both get ``KAZOO_GREEN_BROKERS=<node 1>;<node 2>`` and
``KAZOO_GREEN_SHAPE=standalone`` (tests.standalone's nodes): both consume from both
brokers, publish to the first open one and fail over to the next. One broker is
``kill -9``'d under sync and async load: only calls in flight may fail, every later one is
routed through the other broker (async calls suspended in flight on the dead broker may
stay unanswered: see the kill test).
"""

import shutil
import time

import pytest

from ..conftest import unique
from ..standalone import running_standalone, standalone  # noqa: F401
from . import harness

MISSING = [tool for tool in ('kamailio', 'kamcmd', 'sipp') if not shutil.which(tool)]


@pytest.fixture(scope='module')
def nodes(standalone):  # noqa: F811
    standalone.ensure_all_running()
    return standalone


@pytest.fixture(scope='module')
def kamailio(logdir, nodes):
    assert not MISSING, 'missing %s: run tests/tools/services.sh' % ', '.join(MISSING)
    env = {'KAZOO_GREEN_BROKERS': ';'.join(nodes.urls), 'KAZOO_GREEN_SHAPE': 'standalone'}
    # Queues are declared on every broker: readiness is seen on either (here node 2,
    # the one publishes do not go to).
    try:
        with harness.example(logdir, 'kamailio@kgtest-%s' % unique('sa'), env=env,
                             queues=harness.node_queues(nodes, 2)) as k:
            yield k
    finally:
        nodes.ensure_all_running()


@pytest.fixture(autouse=True)
def kamailio_stays_healthy(kamailio):
    yield
    problem = kamailio.health()
    assert problem is None, problem


@pytest.mark.parametrize('user', ['saalice', 'asyncsaalice'], ids=['sync', 'async'])
def test_invites_are_routed_on_standalone_brokers(kamailio, user):
    result = harness.run_sipp(harness.invite_scenario(user, 302), user, calls=300, rate=100)
    assert result.returncode == 0 and result.failed == 0, result
    assert result.counts.get("302") == 300, result


def test_one_standalone_broker_killed_under_load_only_calls_in_flight_fail(kamailio, nodes):
    seconds, rate = 6, 100
    waits = [harness.spawn_sipp(harness.invite_scenario(user, 302, 503), user,
                                calls=seconds * rate, rate=rate)
             for user in ('sabob', 'asyncsabob')]
    time.sleep(2)
    nodes.kill(1)   # the broker every publish went to
    results = [wait() for wait in waits]
    for user, result in zip(('sabob', 'asyncsabob'), results):
        print('\nstandalone kill, %s: %r' % (user, result))
        answered = result.counts.get('302', 0) + result.counts.get('503', 0)
        # Every call is answered; at most the calls in flight when the broker died (and a
        # worker's next call, which finds its connection dead) get 503. Async too: tm's
        # timer keeps each deadline, whatever the broker lost.
        lost = seconds * rate - answered
        assert result.successful + result.failed == seconds * rate, result
        assert lost == result.failed == 0, result
        assert result.counts.get('503', 0) + lost <= 50, result
    # Everything now goes through node 2, with node 1 still dead.
    assert not nodes.alive(1)
    for user in ('sacarol', 'asyncsacarol'):
        result = harness.run_sipp(harness.invite_scenario(user, 302), user, calls=200,
                                  rate=100)
        assert result.returncode == 0 and result.counts.get('302') == 200, result
