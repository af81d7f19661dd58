"""Independent (unclustered) RabbitMQ nodes on loopback, for zone and standalone tests.

Two nodes, ``kgs1@<host>`` on 127.0.0.1:5691 and ``kgs2@<host>`` on 127.0.0.1:5692 by
default, each a one-node :class:`tests.cluster.Cluster` of its own (data, config, lock
under ``/tmp/kgc-cluster-<port>``): they know nothing of each other, as a Kazoo zone's
brokers often are, or as the brokers of two zones are. The machine's own node (5672), the
failover cluster (5681-5683) and the TLS node (5695/5696) are never touched.

Library use::

    from tests.standalone import Standalone
    s = Standalone(); s.start()
    s.urls                       # ['amqp://guest:guest@127.0.0.1:5691//', '...:5692//']
    s.kill(2); s.restart(2)      # node numbers from 1, as in tests.cluster
    s.ctl(1, 'list_queues')
    s.stop()

pytest: ``from tests.standalone import standalone, running_standalone  # noqa: F401``.
``standalone`` is session-scoped (booted once); ``running_standalone`` brings back a node an
earlier test killed. They are stopped at the end of the session unless ``KGC_KEEP_NODES=1``
(then the next session reuses them). Environment: ``KGS_NAMES``/``KGS_PORTS`` (comma lists) for other names
and ports. Command line: ``python -m tests.standalone up|down|status``.
"""

import argparse
import os
import shutil
import sys
import time

try:
    import pytest
except ImportError:   # the command line works without pytest
    pytest = None

from tests.cluster import SERVER_WRAPPER, Cluster, _parallel, keep_nodes

__all__ = ['Standalone', 'standalone', 'running_standalone']

NAMES = ('kgs1', 'kgs2')
PORTS = (5691, 5692)


class Standalone(object):
    """N independent one-node RabbitMQ "clusters"."""

    def __init__(self, names=None, ports=None):
        names = names or tuple(os.environ.get('KGS_NAMES', ','.join(NAMES)).split(','))
        ports = ports or tuple(int(p) for p in
                               os.environ.get('KGS_PORTS', ','.join(map(str, PORTS))).split(','))
        if len(names) != len(ports):
            raise ValueError('names and ports must have the same length')
        self.nodes = [Cluster(names=(n.strip(),), ports=(p,)) for n, p in zip(names, ports)]
        self.timings = {}

    def __len__(self):
        return len(self.nodes)

    def _node(self, i):
        return self.nodes[i - 1]

    def url(self, i):
        return self._node(i).url(1)

    @property
    def urls(self):
        return [self.url(i) for i in range(1, len(self) + 1)]

    def port(self, i):
        return self._node(i).port(1)

    def ctl(self, i, *args, **kwargs):
        return self._node(i).ctl(1, *args, **kwargs)

    def alive(self, i):
        return self._node(i).alive(1)

    def start(self, timeout=120):
        t0 = time.monotonic()
        _parallel(lambda node: node.start(timeout=timeout), self.nodes)
        self.timings['start'] = time.monotonic() - t0

    def stop(self):
        _parallel(lambda node: node.stop(), self.nodes)

    def kill(self, i):
        """kill -9 node i (returns once it is gone)."""
        self._node(i).kill(1)

    def restart(self, i, timeout=60):
        self._node(i).restart(1, timeout=timeout)

    def ensure_all_running(self, timeout=90):
        _parallel(lambda node: node.ensure_all_running(timeout=timeout), self.nodes)

    def queues(self, i):
        """{queue name: (ready, unacked)} on node i."""
        out = self.ctl(i, 'list_queues', 'name', 'messages_ready',
                       'messages_unacknowledged')
        result = {}
        for line in out.splitlines():
            parts = line.split('\t')
            if len(parts) == 3 and parts[1].isdigit():
                result[parts[0]] = (int(parts[1]), int(parts[2]))
        return result

    def status(self):
        return '\n'.join(node.status() for node in self.nodes)


_shared = None


def shared_standalone():
    global _shared
    if _shared is None:
        s = Standalone()
        s.start()
        _shared = s
        sys.stderr.write('\n[tests.standalone] started %s in %.1f s\n'
                         % (', '.join(n.node(1) for n in s.nodes), s.timings['start']))
    return _shared


def _stop_shared():
    global _shared
    s, _shared = _shared, None
    if s is not None and keep_nodes():
        for node in s.nodes:   # left running for the next session (see keep_nodes)
            node.unlock()
    elif s is not None:
        s.stop()


if pytest is not None:
    @pytest.fixture(scope='session')
    def standalone():
        """Independent RabbitMQ nodes shared by the session; stopped at its end."""
        if shutil.which(SERVER_WRAPPER) is None:
            pytest.skip('rabbitmq-server is not installed')
        try:
            yield shared_standalone()
        finally:
            _stop_shared()

    @pytest.fixture
    def running_standalone(standalone):
        """``standalone`` with every node running (a killed one booted again)."""
        standalone.ensure_all_running()
        return standalone


def main(argv=None):
    ap = argparse.ArgumentParser(prog='python -m tests.standalone',
                                 description=__doc__.split('\n')[0])
    ap.add_argument('action', choices=('up', 'down', 'status'))
    args = ap.parse_args(argv)
    s = Standalone()
    if args.action == 'up':
        s.start()
        for node in s.nodes:
            node.unlock()
        print(s.status())
    elif args.action == 'down':
        s.stop()
    else:
        print(s.status())
    return 0


if __name__ == '__main__':
    sys.exit(main())
