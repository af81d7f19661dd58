"""A throw-away standalone RabbitMQ node with a real TLS listener on loopback, for TLS tests.

Certificates are made at test time with ``trustme``: a CA, a server certificate for
``127.0.0.1`` (IP SAN) and ``localhost`` (DNS SAN), a client certificate from the same CA (for
mutual TLS), and a second, unrelated CA with a client certificate of its own (for "wrong CA"
tests).  They are written into the node dir (``<base_dir>/kgtls1/tls/``, owned by user
``rabbitmq`` so the node can read them, via :class:`tests.cluster.Cluster` ``extra_files``;
``*.pem`` mode 0644, keys 0600), and the node (``kgtls1@<host>``, plain AMQP on
127.0.0.1:5695, AMQPS on 127.0.0.1:5696, Erlang distribution on 25695) gets in its
rabbitmq.conf::

    listeners.ssl.1 = 127.0.0.1:5696
    ssl_options.cacertfile = .../tls/ca.pem
    ssl_options.certfile = .../tls/server.pem
    ssl_options.keyfile = .../tls/server.key
    ssl_options.verify = verify_peer
    ssl_options.fail_if_no_peer_cert = false

so clients without a certificate are let in, and a client certificate, when one is sent, must
chain to the CA.  Ports 5695/5696 stay clear of the default failover cluster (5681-5683) and of
the second cluster its lock error suggests (5691-5693).

pytest: ``from tests.tls import tls_broker  # noqa: F401`` (import ``kazoo_green`` first).  The
session-scoped ``tls_broker`` boots the node once per session (a module-level singleton, like
``tests.cluster.cluster``), waits until the TLS port completes a verified handshake and answers
the AMQP protocol header, and yields a :class:`TLSBroker` with ``amqps_url``, ``amqp_url``,
``ca``, ``wrong_ca``, ``client_cert``, ``client_key``, ``wrong_client_cert``,
``wrong_client_key`` (paths), ``tls_port``, ``port``, ``tls_version`` and ``cipher`` (what the
readiness probe negotiated) and ``node`` (the :class:`~tests.cluster.Cluster`, for ``ctl``).
``broker.ssl()`` builds kombu's ``ssl=`` dict.  The node is stopped (and its dir, certificates
included, removed) at the end of the session, unless ``KGC_KEEP_NODES=1`` (``make test``
keeps it for its second, lowest-version run, then runs ``python -m tests.nodes down``).

A node left running by an interrupted session, or booted with ``python -m tests.tls up``, is
reused when its rabbitmq.conf and certificate files are the ones this module writes and its TLS
port passes the probe; otherwise it is stopped and booted afresh.  Like the cluster, the node is
owned through a flock on ``<base_dir>.lock``: a second session fails fast instead of sharing it.

Command line (clean-up of a leftover node; refuses while a test session owns it)::

    python -m tests.tls up|down|status
    # equivalent, through the generic cluster CLI:
    KGC_CLUSTER_NAMES=kgtls1 KGC_CLUSTER_PORTS=5695 python -m tests.cluster down

Environment: ``KGC_TLS_NAME`` (node short name, default ``kgtls1``), ``KGC_TLS_PORTS``
(``AMQP,AMQPS``, default ``5695,5696``), ``KGC_TLS_DIR`` (base_dir, default
``/tmp/kgc-cluster-<AMQP port>``).  The ``KGC_CLUSTER_*`` variables of the failover cluster are
ignored here.  Must run as root (or as user ``rabbitmq``).
"""

import argparse
import os
import shutil
import socket
import ssl
import sys
import time

try:
    import pytest
except ImportError:  # the command line works without pytest
    pytest = None

from tests.cluster import (
    SERVER_WRAPPER, Cluster, ClusterError, _beams_under, _port_free, keep_nodes,
)

__all__ = ['TLSBroker', 'TLSNode', 'start_tls_broker', 'tls_broker']

DEFAULT_NAME = 'kgtls1'
DEFAULT_PORTS = (5695, 5696)  # plain AMQP, AMQPS
AMQP_HEADER = b'AMQP\x00\x00\x09\x01'
CERT_FILES = ('ca.pem', 'server.pem', 'server.key', 'client.pem', 'client.key',
              'wrong_ca.pem', 'wrong_client.pem', 'wrong_client.key')


def _settings():
    name = os.environ.get('KGC_TLS_NAME') or DEFAULT_NAME
    ports = DEFAULT_PORTS
    if os.environ.get('KGC_TLS_PORTS'):
        ports = tuple(int(p) for p in os.environ['KGC_TLS_PORTS'].split(','))
        if len(ports) != 2:
            raise ValueError('KGC_TLS_PORTS must be AMQP,AMQPS (two ports)')
    return name, ports[0], ports[1]


def make_certs():
    """``{file name: PEM bytes}`` for :data:`CERT_FILES`, freshly made with trustme."""
    import trustme  # only needed when booting afresh

    ca = trustme.CA(organization_name='kazoo_green tests', organization_unit_name='TLS test CA')
    server = ca.issue_cert('127.0.0.1', 'localhost', common_name='kgtls test broker')
    client = ca.issue_cert('client.kgtls.test', common_name='kgtls test client')
    wrong = trustme.CA(organization_name='kazoo_green tests', organization_unit_name='wrong CA')
    wrong_client = wrong.issue_cert('client.kgtls.test', common_name='kgtls wrong client')

    def chain(leaf):
        return b''.join(blob.bytes() for blob in leaf.cert_chain_pems)

    return {
        'ca.pem': ca.cert_pem.bytes(),
        'server.pem': chain(server),
        'server.key': server.private_key_pem.bytes(),
        'client.pem': chain(client),
        'client.key': client.private_key_pem.bytes(),
        'wrong_ca.pem': wrong.cert_pem.bytes(),
        'wrong_client.pem': chain(wrong_client),
        'wrong_client.key': wrong_client.private_key_pem.bytes(),
    }


def probe(port, ca, server_hostname='127.0.0.1', timeout=5.0):
    """One verified TLS handshake with 127.0.0.1:port, then the AMQP header; returns
    ``(tls version, cipher tuple)`` once the broker answered with a method frame
    (Connection.Start).  Raises OSError / ssl.SSLError otherwise; bounded by ``timeout``."""
    ctx = ssl.create_default_context(cafile=ca)  # CERT_REQUIRED, hostname checked
    with socket.create_connection(('127.0.0.1', port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_hostname) as s:
            s.sendall(AMQP_HEADER)
            first = s.recv(7)
            if not first or first[0] != 1:  # frame type 1: a method frame
                raise ConnectionError('no AMQP Connection.Start on port %d: %r' % (port, first))
            return s.version(), s.cipher()


class TLSNode(Cluster):
    """A one-node :class:`~tests.cluster.Cluster` with a TLS listener and its certificates."""

    def __init__(self, name=None, port=None, tls_port=None, base_dir=None, certs=None):
        env_name, env_port, env_tls_port = _settings()
        port = port or env_port
        self.tls_port = tls_port or env_tls_port
        self.certs = certs  # {file: PEM bytes}; None: not made yet (reuse, or ``down``)
        super().__init__(
            base_dir=base_dir or os.environ.get('KGC_TLS_DIR') or '/tmp/kgc-cluster-%d' % port,
            names=(name or env_name,), ports=(port,),
            extra_config=self._tls_config, extra_files=self._tls_files)

    @property
    def cert_dir(self):
        return os.path.join(self.node_dir(1), 'tls')

    def cert_path(self, name):
        return os.path.join(self.cert_dir, name)

    def _tls_config(self, i):
        return ('listeners.ssl.1 = 127.0.0.1:%d\n'
                'ssl_options.cacertfile = %s\n'
                'ssl_options.certfile = %s\n'
                'ssl_options.keyfile = %s\n'
                'ssl_options.verify = verify_peer\n'
                'ssl_options.fail_if_no_peer_cert = false\n'
                % (self.tls_port, self.cert_path('ca.pem'), self.cert_path('server.pem'),
                   self.cert_path('server.key')))

    def _tls_files(self, i):
        if self.certs is None:
            self.certs = make_certs()
        return {os.path.join('tls', name): data for name, data in self.certs.items()}

    def _prepare(self, i):
        super()._prepare(i)  # writes everything 0600, owned by rabbitmq (when run as root)
        for name in CERT_FILES:
            if name.endswith('.pem'):  # certificates are public: any client user may read
                os.chmod(self.cert_path(name), 0o644)

    def _check_free(self, i):
        super()._check_free(i)
        if not _port_free(self.tls_port):
            raise ClusterError('cannot boot %s: TLS port 127.0.0.1:%d is in use'
                               % (self.node(i), self.tls_port))

    def reusable(self):
        """True if the running node was booted by this module with these ports."""
        try:
            with open(os.path.join(self.node_dir(1), 'rabbitmq.conf')) as f:
                conf = f.read()
        except OSError:
            return False
        return (conf == self.rabbitmq_conf(1)
                and all(os.path.isfile(self.cert_path(n)) for n in CERT_FILES))

    def wait_tls(self, deadline):
        """Poll :func:`probe` until it succeeds; ClusterError (with log excerpts) at the
        deadline or when the VM dies.  Returns ``(version, cipher)``."""
        last = None
        while True:
            try:
                return probe(self.tls_port, self.cert_path('ca.pem'),
                             timeout=max(1.0, min(5.0, deadline - time.monotonic())))
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                last = exc
            if not self.alive(1) or time.monotonic() > deadline:
                raise ClusterError('TLS port 127.0.0.1:%d of %s not ready: %r\n%s' % (
                    self.tls_port, self.node(1), last, self._excerpt(1)))
            time.sleep(0.2)

    def status(self):
        line = super().status()
        if not self.alive(1):
            return '%s\n%-18s tls port %d  %s' % (
                line, '', self.tls_port, 'open (not ours?)' if not _port_free(self.tls_port)
                else 'closed')
        try:
            version, cipher = probe(self.tls_port, self.cert_path('ca.pem'), timeout=3)
            tls = 'ok %s %s' % (version, cipher[0])
        except (OSError, ValueError) as exc:
            tls = 'failed (%s)' % (exc.__class__.__name__,)
        return '%s\n%-18s tls port %d  %s' % (line, '', self.tls_port, tls)


class TLSBroker:
    """What ``tls_broker`` yields: URLs, ports and certificate paths of a running TLS node."""

    def __init__(self, node, version, cipher):
        self.node = node
        self.port = node.port(1)
        self.tls_port = node.tls_port
        self.amqp_url = 'amqp://guest:guest@127.0.0.1:%d//' % self.port
        self.amqps_url = 'amqps://guest:guest@127.0.0.1:%d//' % self.tls_port
        self.cert_dir = node.cert_dir
        self.ca = node.cert_path('ca.pem')
        self.client_cert = node.cert_path('client.pem')
        self.client_key = node.cert_path('client.key')
        self.wrong_ca = node.cert_path('wrong_ca.pem')
        self.wrong_client_cert = node.cert_path('wrong_client.pem')
        self.wrong_client_key = node.cert_path('wrong_client.key')
        self.tls_version = version   # negotiated by the readiness probe (default client context)
        self.cipher = cipher         # (name, protocol, secret bits)

    def ssl(self, ca=None, client_cert=False, wrong_client_cert=False,
            server_hostname='127.0.0.1', **extra):
        """kombu's ``ssl=`` dict (py-amqp ``_wrap_socket_sni`` options): verify the server
        against ``ca`` (default: the right CA) and its hostname; optionally present the
        client certificate (or the one from the wrong CA)."""
        opts = {'ca_certs': ca or self.ca, 'cert_reqs': ssl.CERT_REQUIRED,
                'server_hostname': server_hostname}
        if client_cert:
            opts.update(certfile=self.client_cert, keyfile=self.client_key)
        if wrong_client_cert:
            opts.update(certfile=self.wrong_client_cert, keyfile=self.wrong_client_key)
        opts.update(extra)
        return opts

    def __repr__(self):
        return '<TLSBroker %s %s %s>' % (self.amqps_url, self.tls_version, self.cipher[0])


def start_tls_broker(timeout=90, **kwargs):
    """Boot (or reuse, see the module docstring) the TLS node; returns a :class:`TLSBroker`.

    The calling process owns the node (its lock) until ``broker.node.stop()``."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    node = TLSNode(**kwargs)
    try:
        node.lock()
    except ClusterError:
        try:
            with open(node.lock_path) as f:
                holder = f.read().strip() or '?'
        except OSError:
            holder = '?'
        raise ClusterError('TLS node %s (%s) is in use by pid %s; for a separate one set e.g. '
                           'KGC_TLS_NAME=%sb KGC_TLS_PORTS=%d,%d' % (
                               node.node(1), node.base_dir, holder, node.names[0],
                               node.port(1) + 10, node.tls_port + 10)) from None
    try:
        if node.alive(1) or _beams_under(node.base_dir):
            ok = node.reusable()
            if ok:
                try:
                    node.start(timeout=max(10, deadline - time.monotonic()))
                    version, cipher = node.wait_tls(min(deadline, time.monotonic() + 10))
                except ClusterError:
                    ok = False
            if ok:
                node.timings['start'] = time.monotonic() - t0
                node.timings['reused'] = True
                return TLSBroker(node, version, cipher)
            node.stop()  # a node of another layout, or one that does not answer TLS
            node.lock()
        node.certs = make_certs()
        node.start(timeout=max(10, deadline - time.monotonic()))  # writes certs + config
        try:
            version, cipher = node.wait_tls(deadline)
        except ClusterError:
            node.stop()
            raise
    except BaseException:
        node.unlock()
        raise
    node.timings['start'] = time.monotonic() - t0
    return TLSBroker(node, version, cipher)


# -- pytest fixture ----------------------------------------------------------------------------

_shared = None


def shared_tls_broker():
    """The process-wide TLSBroker used by the fixture (started on first use)."""
    global _shared
    if _shared is None:
        b = start_tls_broker()
        _shared = b
        t = b.node.timings
        sys.stderr.write('\n[tests.tls] %s %s in %.1f s%s; probe: %s %s\n' % (
            'reused' if t.get('reused') else 'started', b.node.node(1), t['start'],
            '' if t.get('reused') else ' (VM up after %.1f s)' % t.get('boot', float('nan')),
            b.tls_version, b.cipher[0]))
    return _shared


def _stop_shared():
    global _shared
    b, _shared = _shared, None
    if b is not None and keep_nodes():
        b.node.unlock()   # left running for the next session (make test's second run)
        return
    if b is not None:
        b.node.stop()
        sys.stderr.write('\n[tests.tls] stopped %s in %.1f s\n'
                         % (b.node.node(1), b.node.timings['stop']))


if pytest is not None:
    @pytest.fixture(scope='session')
    def tls_broker():
        """A running standalone RabbitMQ node with a TLS listener; stopped at session end."""
        if shutil.which(SERVER_WRAPPER) is None:
            pytest.skip('rabbitmq-server is not installed')
        try:
            yield shared_tls_broker()
        finally:
            _stop_shared()


# -- command line ------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(prog='python -m tests.tls',
                                 description=__doc__.split('\n')[0])
    ap.add_argument('action', choices=('up', 'down', 'status'))
    ap.add_argument('--timeout', type=float, default=90)
    args = ap.parse_args(argv)
    if args.action == 'up':
        b = start_tls_broker(timeout=args.timeout)
        print(b.node.status())
        print('amqps: %s  amqp: %s' % (b.amqps_url, b.amqp_url))
        print('ca: %s  client: %s %s' % (b.ca, b.client_cert, b.client_key))
        print('%s in %.1f s; TLS %s %s; base dir %s' % (
            'reused' if b.node.timings.get('reused') else 'started', b.node.timings['start'],
            b.tls_version, b.cipher[0], b.node.base_dir))
    elif args.action == 'down':
        node = TLSNode()
        node.stop()
        print('stopped in %.1f s; removed %s' % (node.timings['stop'], node.base_dir))
    else:
        node = TLSNode()
        print(node.status())
        if not node.alive(1):
            print('no TLS node in %s' % node.base_dir)
    return 0


if __name__ == '__main__':
    sys.exit(main())
