"""Stop every RabbitMQ node the test fixtures boot (``make test`` keeps them between its
two runs with ``KGC_KEEP_NODES=1``): the TLS node (tests.tls) and the standalone nodes
(tests.standalone). The failover cluster (tests.cluster) is only used by the first run
and stopped by it.

    python -m tests.nodes down
"""

import sys

from tests.standalone import Standalone
from tests.tls import TLSNode


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv != ['down']:
        sys.stderr.write('usage: python -m tests.nodes down\n')
        return 2
    for node in [TLSNode()] + Standalone().nodes:
        node.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
