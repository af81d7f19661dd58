"""Scenario 4: the Kamailio example under sipp load while the node its workers use dies."""

import kazoo_green  # noqa: F401  (gevent's patching first)

import shutil
import time

import pytest

from ..cluster import cluster, running_cluster  # noqa: F401  (fixtures)
from ..conftest import unique
from ..e2e import harness

MISSING = [tool for tool in ('kamailio', 'kamcmd', 'sipp') if not shutil.which(tool)]


def cluster_queues(c):
    def queues():
        rows = c._ask(lambda i: c._ctl_json(i, 'list_queues', 'name', 'consumers', 'messages',
                                            '--timeout', '20', timeout=40) or [],
                      what='list_queues')
        return {r['name']: (int(r.get('consumers') or 0), int(r.get('messages') or 0))
                for r in rows}
    return queues


def test_4_kamailio_under_load_loses_only_calls_in_flight(running_cluster, tmp_path):
    assert not MISSING, 'missing %s: run tests/tools/services.sh' % ', '.join(MISSING)
    c = running_cluster
    env = {'KAZOO_GREEN_BROKERS': ';'.join(c.urls)}
    queues = cluster_queues(c)
    responder = harness.Responder(str(tmp_path / 'responder.log'), env=env, queues=queues)
    kamailio = harness.Kamailio(str(tmp_path / 'kamailio.log'),
                                node='kamailio@kgtest-%s' % unique('fo'), env=env,
                                queues=queues)
    responder.start()
    kamailio.start()
    try:
        # Everything starts on node 1, the first URL: that is the node that dies.
        seconds, rate = 10, 300
        wait = harness.spawn_sipp(harness.invite_scenario('fobob', 302, 503), 'fobob',
                                  calls=seconds * rate, rate=rate, extra=('-trace_msg',))
        time.sleep(3)
        killed_at = time.time()
        c.kill(1)
        result = wait()
        failed = result.counts.get('503', 0)
        ok_after = [t for t in harness.received_at(result.workdir, 302) if t > killed_at]
        first_ok = ok_after[0] - killed_at if ok_after else None
        last_503 = harness.received_at(result.workdir, 503)
        print('\n[4] Kamailio at %d cps, node 1 killed after 3 s: %r; %d calls answered 503 '
              '(the last %.3fs after the kill); first 302 after the kill in %.3fs'
              % (rate, result, failed, (last_503[-1] - killed_at) if last_503 else 0,
                 first_ok if first_ok is not None else float('nan')))
        def evidence():
            return '\n'.join(harness.log_evidence(str(tmp_path / name))
                             for name in ('responder.log', 'kamailio.log'))
        assert first_ok is not None, evidence()  # calls were answered through another node
        assert result.returncode == 0 and result.failed == 0, result
        assert result.counts.get('302', 0) + failed == seconds * rate
        # Only calls in flight at the kill (plus the responder's own failover) may fail.
        assert failed <= rate, '%d\n%s' % (failed, evidence())
        assert kamailio.health() is None, kamailio.health()
    finally:
        kamailio.stop()
        responder.stop()
