"""A throw-away 3-node RabbitMQ cluster on loopback, for failover tests.

The machine already runs one RabbitMQ node (``rabbit@<host>`` on 127.0.0.1:5672) that other
test runs use; this module never touches it.  It boots *new* nodes (``kgc1@<host>``,
``kgc2@<host>``, ``kgc3@<host>`` on 127.0.0.1:5681-5683 by default, Erlang distribution on
port + 20000), each with its own data, log, pid and config files under ``base_dir``, and
clusters them: every other node joins the first one.  Quorum queues work on it.

Library use::

    from tests.cluster import Cluster
    c = Cluster()                  # base_dir defaults to /tmp/kgc-cluster-<first port>
    c.start()                      # ~10-20 s: boots the nodes in parallel, then clusters them
    c.urls                         # ['amqp://guest:guest@127.0.0.1:5681//', ...]
    c.kill(2); c.restart(2)        # crash node 2 (kill -9), boot it again, wait until it rejoined
    c.freeze(3); c.thaw(3)         # SIGSTOP / SIGCONT node 3's beam.smp
    c.stop()                       # stops every node, kills leftovers, removes base_dir

``Cluster(names=('x1',), ports=(P,))`` is a single standalone node; ``extra_config`` (lines
appended to rabbitmq.conf) and ``extra_files`` (written into the node dir, readable by user
``rabbitmq``) add e.g. a TLS listener and its certificates: tests/tls.py does that.

Nodes are numbered from 1 like their names (``node(1) == 'kgc1@localhost'``); only the
``urls`` list is 0-based (``urls[0]`` is node 1).

pytest: ``from tests.cluster import cluster, running_cluster  # noqa: F401`` in a test module
or conftest.  ``cluster`` is session-scoped and boots one cluster shared by every user (a
module-level singleton, so importing the fixture into several modules still boots once);
``running_cluster`` is the same object after :meth:`Cluster.ensure_all_running`, so a test
starts with every node up even if an earlier test left one killed, frozen or stopped.

Command line (manual use; same default base_dir as the fixture, so ``down`` also cleans what
an interrupted test run left behind; it refuses while a test session owns the cluster)::

    python -m tests.cluster up|down|status

The fixture reuses a cluster already started by ``up`` in the same base_dir (and stops it at
the end of the session).  A process owns a cluster while it runs it: start() and stop() hold
a flock on ``<base_dir>.lock``, so a second session or ``down`` fails fast instead of pulling
nodes away from a running test.  Environment: ``KGC_CLUSTER_NAMES`` and ``KGC_CLUSTER_PORTS``
(comma lists: a second cluster beside the first), ``KGC_CLUSTER_DIR`` (base_dir),
``KGC_CLUSTER_HOST`` (host part of node names).  Must run as root (or as user ``rabbitmq``).

How the nodes are run (checked on this machine kind, RabbitMQ 3.10.8, Debian packaging):

* ``rabbitmq-server`` run as root goes through Debian's wrapper, which re-runs it as user
  ``rabbitmq`` with ``su`` (environment kept, HOME=/var/lib/rabbitmq): every node and every
  ``rabbitmqctl`` share the cookie ``/var/lib/rabbitmq/.erlang.cookie`` (root has none).
  Run as user ``rabbitmq`` the wrapper would redirect output to the *system* node's
  ``/var/log/rabbitmq/startup_log``, so then the real script is called directly.
* It runs in the foreground of a new session (not ``-detached``) with its output in
  ``<node dir>/startup.log``: a detached VM writes early errors (e.g. a config file it
  rejects) nowhere.  ``ERL_CRASH_DUMP`` points into the node dir too (the default is the
  current directory, which the wrapper sets to /var/lib/rabbitmq).
* Config tuned for tests: ``cluster_partition_handling = autoheal`` (a node frozen longer
  than net_ticktime comes back by itself), stats every 1 s and ``quorum_tick_interval`` 1 s
  so ``list_queues`` message counts of quorum queues lag by ~1 s, not 5 s.
* Each node gets its own ``RABBITMQ_CONFIG_FILE``: the machine's ``/etc/rabbitmq/rabbitmq.conf``
  declares ``listeners.tcp.local = 127.0.0.1:5672`` (the system node's port), and its own
  ``RABBITMQ_CONF_ENV_FILE``: the machine's ``rabbitmq-env.conf`` sets ``NODENAME=rabbit@...``.
  ``enabled_plugins`` is ``[].`` (no management listener to collide on).
* The host part of node names is the one the system node uses (``NODENAME`` in
  ``/etc/rabbitmq/rabbitmq-env.conf``, here ``localhost``), else the short hostname; it must
  resolve to a loopback address.  Distribution listens on 127.0.0.1 only.
* ``rabbitmqctl`` always gets ``-n`` (without it, it talks to the system node) and uses its
  own distribution port range (35690-35719), apart from the CLI default 35672-35682 that
  concurrent runs against the system node use.
* Never boot a node that is already running: the failed second instance deletes the
  running one's pid file on its way out.  ``start()`` checks names (epmd) and ports first.
"""

import argparse
import fcntl
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

try:
    import pytest
except ImportError:  # the command line works without pytest
    pytest = None

__all__ = ['Cluster', 'ClusterError', 'cluster', 'running_cluster', 'shared_cluster']

RABBIT_USER = 'rabbitmq'
RABBIT_HOME = '/var/lib/rabbitmq'
SYSTEM_ENV_CONF = '/etc/rabbitmq/rabbitmq-env.conf'
SERVER_WRAPPER = 'rabbitmq-server'                        # Debian wrapper, on PATH (/usr/sbin)
SERVER_SCRIPT = '/usr/lib/rabbitmq/bin/rabbitmq-server'  # the real script, run as rabbitmq
CTL = 'rabbitmqctl'
CTL_DIST_PORTS = (35690, 35719)
EPMD_PORT = 4369
DIST_OFFSET = 20000


class ClusterError(RuntimeError):
    """A node did not boot, join, stop or answer in time (message carries log excerpts)."""


# -- small helpers -----------------------------------------------------------------------------

def _system_host():
    """Host part of node names: the system node's (rabbitmq-env.conf NODENAME) or short host."""
    host = os.environ.get('KGC_CLUSTER_HOST')
    if not host:
        try:
            with open(SYSTEM_ENV_CONF) as f:
                for line in f:
                    m = re.match(r'\s*(?:export\s+)?(?:RABBITMQ_)?NODENAME=["\']?'
                                 r'[^@\s]+@([^"\'\s]+)', line)
                    if m:
                        host = m.group(1)
        except OSError:
            pass
    if not host:
        host = socket.gethostname().split('.')[0]
    try:
        addrs = {ai[4][0] for ai in socket.getaddrinfo(host, None, socket.AF_INET)}
    except socket.gaierror:
        addrs = set()
    if not addrs or not all(a.startswith('127.') for a in addrs):
        host = 'localhost'  # only loopback may be used
    return host


def _port_free(port):
    """True if nothing listens on 127.0.0.1:port (SO_REUSEADDR: TIME_WAIT does not count)."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(('127.0.0.1', port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _port_open(port, timeout=0.5):
    try:
        socket.create_connection(('127.0.0.1', port), timeout=timeout).close()
        return True
    except OSError:
        return False


def epmd_names():
    """Node short names registered in the local epmd (one epmd serves every node)."""
    try:
        s = socket.create_connection(('127.0.0.1', EPMD_PORT), timeout=2)
    except OSError:
        return set()
    try:
        s.sendall(struct.pack('>HB', 1, 110))  # NAMES_REQ
        data = b''
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        return set()
    finally:
        s.close()
    return set(re.findall(r'name (\S+) at port', data[4:].decode('latin-1')))


def _proc_state(pid):
    """State letter of ``pid`` from /proc (R, S, T = stopped, Z = zombie...), None if gone."""
    if not pid:
        return None
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _proc_alive(pid):
    """True if ``pid`` is a live (not zombie) beam.smp process."""
    state = _proc_state(pid)
    if state is None or state in ('Z', 'X'):
        return False
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            return b'beam' in f.read()
    except OSError:
        return False


def _descendants(pid):
    """Every descendant of ``pid`` (erl_child_setup, inet_gethost...)."""
    parent = {}
    for stat in glob.glob('/proc/[0-9]*/stat'):
        try:
            with open(stat) as f:
                parent[int(stat.split('/')[2])] = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def _beams_under(base_dir):
    """PIDs of beam.smp processes whose RABBITMQ_MNESIA_BASE lies in ``base_dir``."""
    found = []
    prefix = ('RABBITMQ_MNESIA_BASE=' + os.path.abspath(base_dir).rstrip('/') + '/').encode()
    for d in glob.glob('/proc/[0-9]*'):
        pid = int(d.rsplit('/', 1)[1])
        if not _proc_alive(pid):
            continue
        try:
            with open(d + '/environ', 'rb') as f:
                env = f.read().split(b'\0')
        except OSError:
            continue
        if any(e.startswith(prefix) for e in env):
            found.append(pid)
    return found


def _tail(path, lines=25):
    """Last lines of a log; if it holds errors, the first error lines come first."""
    try:
        with open(path, errors='replace') as f:
            text = f.readlines()
    except OSError:
        return '(no %s)\n' % path
    first = next((n for n, line in enumerate(text)
                  if '[error]' in line or 'BOOT FAILED' in line), None)
    if first is None or first >= len(text) - lines:
        return ''.join(text[-lines:])
    return ''.join(text[first:first + lines // 2] + ['[...]\n'] + text[-(lines // 2):])


def _parallel(fn, items):
    """Run ``fn(item)`` for every item in threads (greenlets if gevent patched); re-raise."""
    errors = []

    def run(item):
        try:
            fn(item)
        except BaseException as exc:  # noqa: B902 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# -- the cluster -------------------------------------------------------------------------------

class Cluster:
    """N new RabbitMQ nodes on 127.0.0.1 clustered together (the system node excluded).

    Node indices ``i`` are 1-based (node 1 is ``names[0]``).  All waits poll with
    ``time.sleep`` and ``subprocess``, so they cooperate with gevent when it is patched.
    """

    def __init__(self, base_dir=None, names=('kgc1', 'kgc2', 'kgc3'),
                 ports=(5681, 5682, 5683), partition_handling='autoheal',
                 extra_config='', extra_files=None):
        """``extra_config``: lines appended to every node's rabbitmq.conf (e.g. a TLS
        listener), or a callable ``f(i)`` returning node i's lines.  ``extra_files``:
        ``{path relative to the node dir: str or bytes}`` written into every node dir
        before it boots (mode 0600, owned like the rest of the node dir by user
        ``rabbitmq``, so the node can read e.g. certificates), or a callable ``f(i)``
        returning node i's dict.  Both default to nothing: the plain test cluster."""
        if len(names) != len(ports) or not names:
            raise ValueError('names and ports must have the same, non-zero length')
        self.host = _system_host()
        self.names = tuple(names)
        self.ports = tuple(ports)
        self.base_dir = os.path.abspath(
            base_dir or os.environ.get('KGC_CLUSTER_DIR') or '/tmp/kgc-cluster-%d' % ports[0])
        self.partition_handling = partition_handling  # rabbitmq.conf cluster_partition_handling
        self.extra_config = extra_config
        self.extra_files = extra_files or {}
        self.timings = {}          # seconds: 'start' (of which 'boot': VMs up), 'stop'
        self._frozen = set()       # indices we SIGSTOPped
        self._app_stopped = set()  # indices whose rabbit app we stopped (VM still up)
        self._launchers = {}       # index -> Popen of the rabbitmq-server launcher
        self._lock_file = None     # open <base_dir>.lock while this process owns the cluster

    @classmethod
    def from_env(cls, **kwargs):
        """A Cluster laid out by ``KGC_CLUSTER_NAMES`` / ``KGC_CLUSTER_PORTS`` (comma lists)
        when set, e.g. ``kgd1,kgd2,kgd3`` / ``5691,5692,5693`` for a second, independent
        cluster on the same machine (the fixture and the command line use this)."""
        names = os.environ.get('KGC_CLUSTER_NAMES')
        ports = os.environ.get('KGC_CLUSTER_PORTS')
        if names:
            kwargs.setdefault('names', tuple(n.strip() for n in names.split(',')))
        if ports:
            kwargs.setdefault('ports', tuple(int(p) for p in ports.split(',')))
        return cls(**kwargs)

    # ---- ownership -----------------------------------------------------------------------
    @property
    def lock_path(self):
        return self.base_dir + '.lock'

    def lock(self):
        """Own the cluster: an exclusive flock on ``<base_dir>.lock``, held until
        :meth:`unlock` or the end of the process.  :meth:`start` and :meth:`stop` take it, so
        a second process (another test session, ``python -m tests.cluster down``) cannot
        boot, reuse or stop a cluster a running session uses: it gets a ClusterError."""
        if self._lock_file is not None:
            return
        for _ in range(5):
            f = open(self.lock_path, 'a+')
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or '?'
                f.close()
                raise ClusterError(
                    'cluster %s is in use by pid %s; for a separate one set e.g. '
                    'KGC_CLUSTER_NAMES=%s KGC_CLUSTER_PORTS=%s' % (
                        self.base_dir, holder, ','.join(n + 'b' for n in self.names),
                        ','.join(str(p + 10) for p in self.ports)))
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(self.lock_path).st_ino
            except OSError:
                same = False
            if same:  # not a file a releasing owner unlinked meanwhile
                f.seek(0)
                f.truncate()
                f.write('%d\n' % os.getpid())
                f.flush()
                self._lock_file = f
                return
            f.close()
        raise ClusterError('could not lock %s' % self.lock_path)

    def unlock(self, remove=False):
        """Release :meth:`lock` (``remove``: delete the lock file first)."""
        f, self._lock_file = self._lock_file, None
        if f is not None:
            if remove:
                try:
                    os.unlink(self.lock_path)
                except OSError:
                    pass
            f.close()

    # ---- naming ------------------------------------------------------------------------
    def __len__(self):
        return len(self.names)

    @property
    def indices(self):
        return range(1, len(self.names) + 1)

    def _check(self, i):
        if i not in self.indices:
            raise IndexError('node index %r: nodes are numbered 1..%d' % (i, len(self)))
        return i - 1

    def node(self, i):
        """Erlang node name of node i, e.g. ``kgc1@localhost``."""
        return '%s@%s' % (self.names[self._check(i)], self.host)

    def port(self, i):
        """AMQP port of node i (its distribution port is this + 20000)."""
        return self.ports[self._check(i)]

    def url(self, i):
        return 'amqp://guest:guest@127.0.0.1:%d//' % self.port(i)

    @property
    def urls(self):
        """AMQP URLs of every node, in node order (``urls[0]`` is node 1)."""
        return [self.url(i) for i in self.indices]

    def node_dir(self, i):
        return os.path.join(self.base_dir, self.names[self._check(i)])

    def log_file(self, i):
        return os.path.join(self.node_dir(i), 'log', self.node(i) + '.log')

    def _pid_file(self, i):
        return os.path.join(self.node_dir(i), 'pid')

    def pid(self, i):
        """OS pid of node i's beam.smp (from its pid file; None if it has none)."""
        try:
            with open(self._pid_file(i)) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def alive(self, i):
        """True if node i's Erlang VM process exists (it may be frozen or have its app stopped)."""
        return _proc_alive(self.pid(i))

    # ---- rabbitmqctl -------------------------------------------------------------------
    def _env(self):
        env = dict(os.environ)
        env['RABBITMQ_CTL_DIST_PORT_MIN'] = str(CTL_DIST_PORTS[0])
        env['RABBITMQ_CTL_DIST_PORT_MAX'] = str(CTL_DIST_PORTS[1])
        if os.geteuid() != 0:
            env['HOME'] = RABBIT_HOME  # same cookie as the nodes
        return env

    def ctl(self, i, *args, timeout=60, check=True):
        """Run ``rabbitmqctl -n <node i> -q ARGS``; returns stdout (ClusterError on failure)."""
        cmd = [CTL, '-n', self.node(i), '-q'] + [str(a) for a in args]
        # own session: on timeout the whole tree (wrapper, su, erl) is killed; killing only
        # the wrapper leaves erl holding the pipes and communicate() waiting for it.
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             stdin=subprocess.DEVNULL, env=self._env(), cwd='/',
                             start_new_session=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [p.pid] + _descendants(p.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            p.communicate()
            if check:
                raise ClusterError('%s: timed out after %ss' % (' '.join(cmd), timeout))
            return ''
        if check and p.returncode != 0:
            raise ClusterError('%s: exit %d\n%s%s' % (' '.join(cmd), p.returncode,
                                                       out[-2000:], err[-2000:]))
        return out

    def _ctl_json(self, i, *args, timeout=30):
        out = self.ctl(i, *(args + ('--formatter', 'json')), timeout=timeout)
        try:
            return json.loads(out) if out.strip() else None
        except ValueError:  # e.g. {:badrpc, {:timeout, ...}} printed with exit status 0
            raise ClusterError('rabbitmqctl -n %s %s: %s' % (self.node(i), ' '.join(args),
                                                             out.strip()[:500]))

    def _live(self, exclude=()):
        """Indices able to answer queries: VM alive, not frozen, app not stopped by us."""
        return [i for i in self.indices
                if i not in exclude and i not in self._app_stopped and not self.frozen(i)
                and self.alive(i)]

    def frozen(self, i):
        """True if node i's VM is stopped by SIGSTOP (by us or by another process)."""
        return i in self._frozen or _proc_state(self.pid(i)) in ('T', 't')

    def _ask(self, fn, exclude=(), what='query'):
        """Run ``fn(i)`` on the first live node that answers."""
        errors = []
        for i in self._live(exclude):
            try:
                return fn(i)
            except ClusterError as exc:
                errors.append(str(exc))
        raise ClusterError('no live node answered the %s:\n%s' % (what, '\n'.join(errors)))

    # ---- queries -----------------------------------------------------------------------
    def cluster_status(self, via=None, timeout=30):
        """``rabbitmqctl cluster_status`` as a dict, from node ``via`` (default: a live one)."""
        if via is not None:
            return self._ctl_json(via, 'cluster_status', timeout=timeout)
        return self._ask(lambda i: self._ctl_json(i, 'cluster_status', timeout=timeout),
                         what='cluster_status')

    def running_nodes(self, via=None):
        """Sorted names of running nodes per ``cluster_status`` of a live node (or node ``via``).

        ``cluster_status`` asks every member for its listeners and alarms, so it blocks while
        a member is frozen (until net_ticktime, 60 s, declares it down).  Then, and whenever it
        fails, the same list is read from ``rabbit_nodes:all_running()`` (local, no RPC).
        A frozen node counts as running until then.
        """
        def ask(i):
            if not any(self.frozen(j) for j in self.indices):
                try:
                    return sorted(self._ctl_json(i, 'cluster_status', timeout=15)
                                  ['running_nodes'])
                except ClusterError:
                    pass
            out = self.ctl(i, 'eval', 'rabbit_nodes:all_running().', timeout=15)
            return sorted(re.findall(r"[\w.-]+@[\w.-]+", out))
        if via is not None:
            return ask(via)
        return self._ask(ask, what='running nodes')

    def members(self, via=None):
        """Every node name the cluster knows (disc + ram nodes), running or not."""
        st = self.cluster_status(via)
        return sorted(set(st.get('disk_nodes', [])) | set(st.get('ram_nodes', [])))

    def queue_messages(self, queue, vhost='/'):
        """Messages (ready + unacked) in ``queue``, asked via ``list_queues`` of a live node."""
        def ask(i):
            rows = self._ctl_json(i, 'list_queues', '-p', vhost, 'name', 'messages',
                                  '--timeout', '20', timeout=40) or []
            for row in rows:
                if row.get('name') == queue:
                    return int(row.get('messages') or 0)
            raise LookupError('queue %r not found via %s' % (queue, self.node(i)))
        return self._ask(ask, what='list_queues')

    def connection_count(self, i):
        """Client connections on node i (asked of node i itself)."""
        out = self.ctl(i, 'eval', 'length(rabbit_networking:connections_local()).', timeout=30)
        return int(out.strip())

    # ---- booting -----------------------------------------------------------------------
    def rabbitmq_conf(self, i):
        """The text of node i's rabbitmq.conf (written by :meth:`_prepare` at each boot)."""
        extra = self.extra_config(i) if callable(self.extra_config) else self.extra_config
        if extra and not extra.endswith('\n'):
            extra += '\n'
        return ('listeners.tcp.1 = 127.0.0.1:%d\n'
                'loopback_users.guest = true\n'
                'cluster_partition_handling = %s\n'
                'collect_statistics_interval = 1000\n'
                % (self.port(i), self.partition_handling)) + (extra or '')

    def _extra_files(self, i):
        files = self.extra_files(i) if callable(self.extra_files) else self.extra_files
        return dict(files or {})

    def _prepare(self, i):
        d = self.node_dir(i)
        os.makedirs(os.path.join(d, 'log'), exist_ok=True)
        os.makedirs(os.path.join(d, 'mnesia'), exist_ok=True)
        for name, data in self._extra_files(i).items():
            path = os.path.normpath(os.path.join(d, name))
            if not path.startswith(d + os.sep):
                raise ValueError('extra file %r is outside the node dir' % name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with open(fd, 'wb') as f:
                f.write(data.encode() if isinstance(data, str) else data)
        files = {
            'enabled_plugins': '[].\n',
            'rabbitmq.conf': self.rabbitmq_conf(i),
            # queue message counts (list_queues) of quorum queues are refreshed every tick
            'advanced.config': '[{rabbit, [{quorum_tick_interval, 1000}]}].\n',
            'rabbitmq-env.conf': '# kgc test node: nothing from /etc/rabbitmq/rabbitmq-env.conf\n',
        }
        for name, text in files.items():
            with open(os.path.join(d, name), 'w') as f:
                f.write(text)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(RABBIT_USER)
            for path in [self.base_dir] + [os.path.join(r, n) for r, ds, fs in os.walk(d)
                                           for n in ds + fs] + [d]:
                os.chown(path, pw.pw_uid, pw.pw_gid)

    def _server_env(self, i):
        d = self.node_dir(i)
        env = self._env()
        for k in [k for k in env if k.startswith(('RABBITMQ_', 'ERL_'))
                  and not k.startswith('RABBITMQ_CTL_')]:
            del env[k]
        env.update({
            'RABBITMQ_NODENAME': self.node(i),
            'RABBITMQ_NODE_IP_ADDRESS': '127.0.0.1',
            'RABBITMQ_NODE_PORT': str(self.port(i)),
            'RABBITMQ_DIST_PORT': str(self.port(i) + DIST_OFFSET),
            'RABBITMQ_MNESIA_BASE': os.path.join(d, 'mnesia'),
            'RABBITMQ_LOG_BASE': os.path.join(d, 'log'),
            'RABBITMQ_PID_FILE': self._pid_file(i),
            'RABBITMQ_ENABLED_PLUGINS_FILE': os.path.join(d, 'enabled_plugins'),
            'RABBITMQ_CONFIG_FILE': os.path.join(d, 'rabbitmq.conf'),
            'RABBITMQ_ADVANCED_CONFIG_FILE': os.path.join(d, 'advanced.config'),
            'RABBITMQ_CONF_ENV_FILE': os.path.join(d, 'rabbitmq-env.conf'),
            'RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS': '-kernel inet_dist_use_interface {127,0,0,1}',
            'ERL_EPMD_ADDRESS': '127.0.0.1',
            'ERL_CRASH_DUMP': os.path.join(d, 'erl_crash.dump'),  # not /var/lib/rabbitmq
            'HOME': RABBIT_HOME,
        })
        return env

    def _check_free(self, i):
        problems = []
        if self.names[i - 1] in epmd_names():
            problems.append('node name %s is already registered in epmd' % self.node(i))
        for port in (self.port(i), self.port(i) + DIST_OFFSET):
            if not _port_free(port):
                problems.append('127.0.0.1:%d is in use' % port)
        if problems:
            raise ClusterError('cannot boot %s: %s (a cluster left by another run? '
                               '`python -m tests.cluster down`, or other names/ports)'
                               % (self.node(i), '; '.join(problems)))

    def _boot(self, i):
        """Launch node i's VM; returns at once (see :meth:`_wait_booted`).

        ``rabbitmq-server`` runs in the foreground of a new session rather than with
        ``-detached``: a detached VM's stdout is /dev/null, so errors raised before logging
        starts (a bad config file, say) would be lost; here they land in ``startup.log``.
        """
        self._check_free(i)
        self._prepare(i)
        try:
            os.unlink(self._pid_file(i))
        except OSError:
            pass
        if os.geteuid() == 0:
            cmd = [SERVER_WRAPPER]  # su's to rabbitmq, environment kept
        elif pwd.getpwuid(os.geteuid()).pw_name == RABBIT_USER:
            cmd = [SERVER_SCRIPT]   # the wrapper would write to the system node's startup_log
        else:
            raise ClusterError('run as root or as user %s (rabbitmq-server refuses others)'
                               % RABBIT_USER)
        self._reap()
        with open(os.path.join(self.node_dir(i), 'startup.log'), 'ab') as out:
            self._launchers[i] = subprocess.Popen(
                cmd, env=self._server_env(i), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd='/', start_new_session=True)
        self._frozen.discard(i)
        self._app_stopped.discard(i)

    def _reap(self):
        """Collect launcher processes (wrapper/su/script) that have exited."""
        for i, p in list(self._launchers.items()):
            if p.poll() is not None:
                del self._launchers[i]

    def _launcher_exited(self, i):
        p = self._launchers.get(i)
        return p is not None and p.poll() is not None

    def _excerpt(self, i):
        return ('--- %s (pid %s, alive %s)\n--- startup.log:\n%s--- %s:\n%s' % (
            self.node(i), self.pid(i), self.alive(i),
            _tail(os.path.join(self.node_dir(i), 'startup.log'), 16),
            self.log_file(i), _tail(self.log_file(i))))

    def _wait_booted(self, i, deadline):
        """Wait until node i accepts AMQP connections and ``await_startup`` succeeds."""
        launched = time.monotonic()
        while True:
            if _port_open(self.port(i)):
                left = max(5, deadline - time.monotonic())
                try:
                    self.ctl(i, 'await_startup', '--timeout', int(left), timeout=left + 10)
                    return
                except ClusterError:
                    if time.monotonic() > deadline:
                        raise
            failed = 'BOOT FAILED' in _tail(self.log_file(i), 200)
            vanished = (self.pid(i) is None and not _beams_under(self.node_dir(i))
                        and (self._launcher_exited(i) or time.monotonic() - launched > 30))
            died = self.pid(i) is not None and not self.alive(i)
            if failed or vanished or died or time.monotonic() > deadline:
                raise ClusterError('node %s did not boot (%s)\n%s' % (
                    self.node(i), 'boot failed' if failed else 'VM gone' if (vanished or died)
                    else 'timeout', self._excerpt(i)))
            time.sleep(0.2)

    def _wait_running(self, expected, deadline):
        """Wait until cluster_status (of a live node) lists exactly ``expected`` as running."""
        want = sorted(self.node(i) for i in expected)
        last = None
        while True:
            try:
                last = self.running_nodes()
                if last == want:
                    return last
            except ClusterError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise ClusterError('running nodes are %s, expected %s\n%s' % (
                    last, want, '\n'.join(self._excerpt(i) for i in self.indices)))
            time.sleep(0.5)

    def start(self, timeout=120):
        """Boot every node (in parallel), join nodes 2..N to node 1, wait until all run.

        Idempotent-ish: nodes whose VM already runs from this ``base_dir`` are kept, nodes
        already clustered are not joined again.  Raises ClusterError with log excerpts; a
        fresh start that fails is stopped and removed again (the excerpt is in the error).
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        self.lock()
        fresh = not any(self.alive(i) for i in self.indices) and not _beams_under(self.base_dir)
        # nodes with data whose VM is gone (killed) rejoin by themselves when booted again
        todo = [i for i in self.indices if not self.alive(i)]
        for i in todo:
            self._check_free(i)
        if fresh:
            shutil.rmtree(self.base_dir, ignore_errors=True)  # leftovers of a crashed run
        os.makedirs(self.base_dir, exist_ok=True)
        try:
            self._thaw_all()  # a frozen member stalls a booting node's table sync for 60 s
            for i in todo:
                self._boot(i)
            self._start_apps(deadline)
            _parallel(lambda i: self._wait_booted(i, deadline), todo)
            self.timings['boot'] = time.monotonic() - t0
            seed = self.node(1)
            known = set(self.members(via=1))
            joiners = [i for i in self.indices if i != 1 and self.node(i) not in known]
            _parallel(lambda i: self.ctl(i, 'stop_app'), joiners)
            for i in joiners:  # one at a time: concurrent joins to one seed can race in mnesia
                self.ctl(i, 'join_cluster', seed)
            _parallel(lambda i: self.ctl(i, 'start_app',
                                         timeout=max(30, deadline - time.monotonic())), joiners)
            self._settle(deadline)
        except BaseException:
            if fresh:
                try:
                    self.stop()
                except ClusterError:
                    pass
            raise
        self.timings['start'] = time.monotonic() - t0
        return self

    def _thaw_all(self):
        """SIGCONT every stopped VM: ours, or one a crashed test process left frozen."""
        for i in self.indices:
            if self.frozen(i):
                self.thaw(i)

    def _start_apps(self, deadline):
        """``start_app`` on the nodes whose app we stopped."""
        for i in sorted(self._app_stopped):
            self.ctl(i, 'start_app', timeout=max(30, deadline - time.monotonic()))
            self._app_stopped.discard(i)

    def _settle(self, deadline, patience=20):
        """Wait until all N nodes run.  If they do not within ``patience`` seconds, a VM is up
        but outside the cluster: partitioned (frozen longer than net_ticktime and not yet
        autohealed) or its app stopped by someone else.  Then restart the app of every node
        outside the largest view, as the RabbitMQ docs advise for partitions, and wait again.
        """
        try:
            self._wait_running(self.indices, min(deadline, time.monotonic() + patience))
            return
        except ClusterError:
            if time.monotonic() > deadline:
                raise
        views = {}
        for i in self._live():
            try:
                views[i] = set(self.running_nodes(via=i))
            except ClusterError:
                views[i] = set()
        best = max(views.values(), key=len, default=set())
        for i in [i for i in self.indices if self.node(i) not in best]:
            self.ctl(i, 'stop_app', timeout=60)
            self.ctl(i, 'start_app', timeout=max(30, deadline - time.monotonic()))
        self._wait_running(self.indices, deadline)

    # ---- stopping ----------------------------------------------------------------------
    def _wait_gone(self, pids, timeout):
        deadline = time.monotonic() + timeout
        while any(_proc_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [p for p in pids if _proc_alive(p)]

    def _sigkill_tree(self, pid):
        victims = [pid] + _descendants(pid)
        for p in victims:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        return victims

    def stop(self, timeout=30):
        """Stop every node (``rabbitmqctl stop``, then kill -9 leftovers), remove base_dir.

        Raises ClusterError if a beam process of this cluster survives.
        """
        t0 = time.monotonic()
        self.lock()
        self._thaw_all()
        pids = [p for p in [self.pid(i) for i in self.indices] if _proc_alive(p)]
        pids += [p for p in _beams_under(self.base_dir) if p not in pids]
        if pids:
            live = [i for i in self.indices if self.alive(i)]
            _parallel(lambda i: self.ctl(i, 'stop', timeout=timeout, check=False), live)
            left = self._wait_gone(pids, 10)
            for p in left + _beams_under(self.base_dir):
                self._sigkill_tree(p)
            left = self._wait_gone(left + _beams_under(self.base_dir), 10)
            if left:
                raise ClusterError('beam processes survived kill -9: %s' % left)
            deadline = time.monotonic() + 5  # zombies until pid 1 reaps them (ps: <defunct>)
            while any(os.path.exists('/proc/%d' % p) for p in pids) and \
                    time.monotonic() < deadline:
                time.sleep(0.1)
        self._frozen.clear()
        self._app_stopped.clear()
        for p in self._launchers.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._reap()
        deadline = time.monotonic() + 10  # epmd drops names when the VM's socket closes
        while set(self.names) & epmd_names() and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        if os.path.exists(self.base_dir):
            raise ClusterError('could not remove %s' % self.base_dir)
        self.unlock(remove=True)
        self.timings['stop'] = time.monotonic() - t0

    # ---- failure injection -------------------------------------------------------------
    def kill(self, i):
        """Crash node i: kill -9 its beam.smp and its descendants; wait until it is gone."""
        pid = self.pid(i)
        if not _proc_alive(pid):
            raise ClusterError('%s is not running' % self.node(i))
        victims = self._sigkill_tree(pid)
        self._frozen.discard(i)
        self._app_stopped.discard(i)
        if self._wait_gone(victims[:1], 10):
            raise ClusterError('%s (pid %s) survived kill -9' % (self.node(i), pid))
        self._reap()
        deadline = time.monotonic() + 10
        while self.names[i - 1] in epmd_names() and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self, i, timeout=60):
        """Boot node i again after a kill or full stop; wait until it rejoined the cluster."""
        deadline = time.monotonic() + timeout
        if self.alive(i):
            raise ClusterError('%s is still running (pid %s)' % (self.node(i), self.pid(i)))
        self._boot(i)
        self._wait_booted(i, deadline)
        self._wait_running(self._running_expected(), deadline)

    def _running_expected(self):
        return [j for j in self.indices if self.alive(j) and j not in self._app_stopped]

    def freeze(self, i):
        """SIGSTOP node i's beam.smp (returns once it is stopped): sockets stay open, the
        kernel still accepts TCP connections, nothing is answered.

        Peers declare it down only after net_ticktime (60 s); a longer freeze partitions
        the cluster (autoheal then restarts the loser's app after the thaw).  Meanwhile
        ``cluster_status`` on every node blocks, see :meth:`running_nodes`.
        """
        pid = self.pid(i)
        if not _proc_alive(pid):
            raise ClusterError('%s is not running' % self.node(i))
        os.kill(pid, signal.SIGSTOP)
        self._frozen.add(i)
        self._wait_state(pid, lambda st: st in ('T', 't'), 'stop')

    def thaw(self, i):
        """SIGCONT node i's beam.smp (returns once it runs again)."""
        pid = self.pid(i)
        if _proc_alive(pid):
            os.kill(pid, signal.SIGCONT)
            self._wait_state(pid, lambda st: st not in ('T', 't'), 'continue')
        self._frozen.discard(i)

    @staticmethod
    def _wait_state(pid, ok, what, timeout=5):
        """Signals reach a many-threaded VM asynchronously: wait for /proc to agree."""
        deadline = time.monotonic() + timeout
        while True:
            state = _proc_state(pid)
            if state is None or ok(state):
                return
            if time.monotonic() > deadline:
                raise ClusterError('pid %d did not %s (state %s)' % (pid, what, state))
            time.sleep(0.01)

    def stop_node(self, i, full=False, timeout=60):
        """Stop node i cleanly: ``stop_app`` (VM stays up), or with ``full`` the whole VM."""
        if full:
            pid = self.pid(i)
            self.ctl(i, 'stop', timeout=timeout)
            if self._wait_gone([pid], timeout):
                raise ClusterError('%s did not exit after stop' % self.node(i))
            self._app_stopped.discard(i)
        else:
            self.ctl(i, 'stop_app', timeout=timeout)
            self._app_stopped.add(i)

    def start_node(self, i, timeout=60):
        """Undo :meth:`stop_node` (``start_app``, or boot the VM again); wait until it runs."""
        deadline = time.monotonic() + timeout
        if self.alive(i):
            self.ctl(i, 'start_app', timeout=timeout)
            self._app_stopped.discard(i)
            self._wait_running(self._running_expected(), deadline)
        else:
            self.restart(i, timeout=timeout)

    def start_apps(self, indices=None, timeout=120):
        """``start_app`` on several app-stopped nodes at once (a node waits for the peers
        it was clustered with, so after stopping them all, one at a time would hang)."""
        indices = list(self.indices if indices is None else indices)
        errors = []

        def start(i):
            try:
                self.ctl(i, 'start_app', timeout=timeout)
            except Exception as exc:  # reported below, after every node was tried
                errors.append((i, exc))

        _parallel(start, indices)
        if errors:
            raise ClusterError('start_app failed: %s' % errors)
        for i in indices:
            self._app_stopped.discard(i)
        self._wait_running(self._running_expected(), time.monotonic() + timeout)

    def ensure_all_running(self, timeout=90):
        """Bring back every killed, stopped or frozen node; wait until all N are running.

        Cheap when nothing is wrong (one ``cluster_status``); use it between tests.
        """
        deadline = time.monotonic() + timeout
        self._thaw_all()
        dead = [i for i in self.indices if not self.alive(i)]
        for i in dead:
            self._boot(i)
        self._start_apps(deadline)
        _parallel(lambda i: self._wait_booted(i, deadline), dead)
        self._settle(deadline)

    def status(self):
        """One line per node: pid, VM alive, port open, flags (for humans)."""
        lines = []
        for i in self.indices:
            flags = [f for f, on in (('frozen', self.frozen(i)),
                                     ('app-stopped', i in self._app_stopped)) if on]
            lines.append('%-18s port %d  pid %-7s vm %-5s amqp %-6s %s' % (
                self.node(i), self.port(i), self.pid(i), 'up' if self.alive(i) else 'down',
                'open' if _port_open(self.port(i)) else 'closed', ' '.join(flags)))
        return '\n'.join(lines)


def keep_nodes():
    """``KGC_KEEP_NODES=1``: session fixtures leave the nodes they used running (and
    unlocked) for the next session to reuse; ``python -m tests.nodes down`` stops them."""
    return os.environ.get('KGC_KEEP_NODES') == '1'


# -- pytest fixtures ---------------------------------------------------------------------------

_shared = None


def shared_cluster():
    """The process-wide Cluster used by the fixtures (started on first use)."""
    global _shared
    if _shared is None:
        c = Cluster.from_env()
        c.start()  # holds the cluster's lock until the session ends
        _shared = c
        sys.stderr.write('\n[tests.cluster] started %s in %.1f s\n'
                         % (', '.join(c.node(i) for i in c.indices), c.timings['start']))
    return _shared


def _stop_shared():
    global _shared
    c, _shared = _shared, None
    if c is not None:
        c.stop()
        sys.stderr.write('\n[tests.cluster] stopped in %.1f s (start took %.1f s)\n'
                         % (c.timings['stop'], c.timings.get('start', float('nan'))))


if pytest is not None:
    @pytest.fixture(scope='session')
    def cluster():
        """A running 3-node cluster shared by the whole session; stopped at its end."""
        if shutil.which(SERVER_WRAPPER) is None:
            pytest.skip('rabbitmq-server is not installed')
        try:
            yield shared_cluster()
        finally:
            _stop_shared()

    @pytest.fixture
    def running_cluster(cluster):
        """``cluster`` with every node running (dead/frozen/stopped nodes brought back)."""
        cluster.ensure_all_running()
        return cluster


# -- command line ------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(prog='python -m tests.cluster',
                                 description=__doc__.split('\n')[0])
    ap.add_argument('action', choices=('up', 'down', 'status'))
    ap.add_argument('--dir', help='base dir (default /tmp/kgc-cluster-<first port>)')
    ap.add_argument('--timeout', type=float, default=120)
    args = ap.parse_args(argv)
    c = Cluster.from_env(base_dir=args.dir)
    if args.action == 'up':
        c.start(timeout=args.timeout)
        print(c.status())
        print('running: %s' % ' '.join(c.running_nodes()))
        print('urls: %s' % ' '.join(c.urls))
        print('started in %.1f s; base dir %s' % (c.timings['start'], c.base_dir))
    elif args.action == 'down':
        c.stop()
        print('stopped in %.1f s; removed %s' % (c.timings['stop'], c.base_dir))
    else:
        print(c.status())
        try:
            with open(c.lock_path) as f:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(c.lock_path) as f:
                print('in use by pid %s' % f.read().strip())
        except OSError:
            pass
        if any(c.alive(i) for i in c.indices):
            try:
                print('running (cluster_status): %s' % ' '.join(c.running_nodes()))
            except ClusterError as exc:
                print('cluster_status failed: %s' % exc)
        else:
            print('no node of %s is running' % c.base_dir)
    return 0


if __name__ == '__main__':
    sys.exit(main())
