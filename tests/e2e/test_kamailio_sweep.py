"""The Kamailio example when a cluster's dead-node clean-up deletes its fixed-name queues.

RabbitMQ 3.x deletes the transient queues of a node that died by name; one declared again
meanwhile on a surviving node loses its record and bindings while its consumers live on
(rabbitmq-server#6271, kazoo_green._sweep). Here the local broker runs that clean-up's own
calls (tests.conftest.clean_up_like_node_down) on the instance's resume queue and on the
responder's queue; Kamailio and the responder are given the broker twice, a cluster to
them. Both queues are declared again; sync and async calls are routed as before.
"""

import shutil

from ..conftest import (RABBIT_URL, clean_up_like_node_down, close_connections, rabbitmqctl,
                        unique)
from . import harness

MISSING = [tool for tool in ('kamailio', 'kamcmd', 'sipp') if not shutil.which(tool)]


def consuming_connections(*owners):
    """The broker's pids of the consuming connections (link ``consume``) of ``owners``."""
    out = rabbitmqctl('list_connections', 'pid', 'client_properties')
    return {line.split('\t', 1)[0] for line in out.splitlines()
            if line.startswith('<') and any('%s consume ' % o in line for o in owners)}


def test_queues_deleted_by_the_clean_up_are_declared_again_and_calls_routed(logdir):
    assert not MISSING, 'missing %s: run tests/tools/services.sh' % ', '.join(MISSING)
    env = {'KAZOO_GREEN_BROKERS': ';'.join([RABBIT_URL, RABBIT_URL])}
    node = 'kamailio@kgtest-%s' % unique('sweep')
    resume = '%s-resume' % node
    with harness.example(logdir, node, env=env) as k:
        try:
            for user in ('swalice', 'asyncswalice'):
                result = harness.run_sipp(harness.invite_scenario(user, 302), user, calls=50,
                                          rate=100)
                assert result.failed == 0 and result.counts.get('302') == 50, result
            # As when a node dies: every connection lost, the queues declared again on
            # the reconnect, and the clean-up after it. Each consumer process and the
            # responder look at their queues 0.2 to 16 s after the reconnect
            # (kazoo_green._sweep.CHECKS).
            owners = (node, 'responder@')
            before = consuming_connections(*owners)
            assert len(before) >= 2, before
            close_connections(*owners)
            assert harness.wait_until(lambda: (lambda now: len(now) == len(before)
                                               and not now & before)(
                consuming_connections(*owners)), 30), (before, consuming_connections(*owners))
            swept = k.statistics().get('queues_swept', 0)
            clean_up_like_node_down(resume)
            clean_up_like_node_down(harness.Responder.QUEUE)
            assert harness.wait_until(
                lambda: k.statistics().get('queues_swept', 0) > swept, 30), k.statistics()
            assert harness.wait_until(lambda: k.queues().get(resume, (0, 0))[0] >= 1, 30), \
                k.queues().get(resume)
            assert harness.wait_until(
                lambda: k.queues().get(harness.Responder.QUEUE, (0, 0))[0] >= 1, 30), \
                k.queues().get(harness.Responder.QUEUE)
            for user in ('swbob', 'asyncswbob'):
                result = harness.run_sipp(harness.invite_scenario(user, 302), user, calls=50,
                                          rate=100)
                assert result.failed == 0 and result.counts.get('302') == 50, result
            assert k.statistics().get('setup_errors') == 0, k.statistics()
            assert k.health() is None, k.health()
        finally:
            harness.subprocess.run(['rabbitmqctl', '-q', 'delete_queue', resume],
                                   capture_output=True)
