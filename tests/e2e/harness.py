"""Run the Kamailio example, the example responder and sipp; read back what happened.

Used by the end-to-end tests and by bench/compare.py. Everything listens on
127.0.0.1 only.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = os.path.join(ROOT, '.venv', 'bin', 'python')
KAMAILIO_CFG = os.path.join(ROOT, 'examples', 'kamailio', 'kamailio.cfg')
SIP_PORT = 5060
CTL = 'unix:/tmp/kazoo_green_e2e_ctl'
HTTP_PORT = 5081   # the example's default KAZOO_GREEN_HTTP_PORT


def parse_queues(out):
    """``list_queues name consumers messages`` output as {name: (consumers, messages)}."""
    queues = {}
    for line in out.splitlines():
        parts = line.split('\t')
        if len(parts) == 3 and parts[1].isdigit():
            queues[parts[0]] = (int(parts[1]), int(parts[2]))
    return queues


def rabbit_queues():
    """The queues of the local RabbitMQ (127.0.0.1:5672)."""
    return parse_queues(subprocess.run(
        ['rabbitmqctl', '-q', 'list_queues', 'name', 'consumers', 'messages'],
        capture_output=True, text=True, timeout=60).stdout)


def node_queues(node, i=1):
    """A ``queues`` function for node ``i`` of a tests.cluster.Cluster (or the TLS node, or tests.standalone.Standalone)."""
    return lambda: parse_queues(node.ctl(i, 'list_queues', 'name', 'consumers', 'messages'))


def wait_until(predicate, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


class Responder(object):
    """examples/responder.py in a subprocess."""

    QUEUE = 'responder-route-req'

    def __init__(self, log_path, env=None, queues=rabbit_queues):
        self.log_path = log_path
        self.env = env or {}
        self.queues = queues  # how to list the broker's queues (another broker: another fn)
        self.proc = None

    def start(self):
        others = self.queues().get(self.QUEUE, (0, 0))[0]
        if others:
            raise RuntimeError('%d other consumer(s) already on %s: another responder runs '
                               'and would answer in this one\'s place' % (others, self.QUEUE))
        self._log = open(self.log_path, 'a')
        self.proc = subprocess.Popen([PYTHON, os.path.join(ROOT, 'examples', 'responder.py')],
                                     cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, **self.env))
        if not wait_until(lambda: self.queues().get(self.QUEUE, (0, 0))[0] >= 1, 30):
            raise RuntimeError('responder did not start consuming; see %s' % self.log_path)

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


@contextlib.contextmanager
def example(logdir, node, env=None, queues=rabbit_queues):
    """The example responder and the example Kamailio (``node``), started in that order
    with ``env`` and stopped at the end; yields the Kamailio."""
    responder = Responder(os.path.join(str(logdir), 'responder.log'), env=env, queues=queues)
    responder.start()
    k = Kamailio(os.path.join(str(logdir), 'kamailio.log'), node=node, env=env, queues=queues)
    try:
        k.start()
        yield k
    finally:
        k.stop()
        responder.stop()


class Kamailio(object):
    """kamailio -f examples/kamailio/kamailio.cfg -DD -E, as the README says to run it."""

    def __init__(self, log_path, node='kamailio@kgtest-e2e', env=None, queues=rabbit_queues,
                 cfg=KAMAILIO_CFG):
        self.cfg = cfg   # the first example's, or examples/kazoo-node's
        self.log_path = log_path
        self.node = node
        self.env = env or {}
        self.queues = queues
        self.proc = None
        self.pids = set()
        self.http_port = HTTP_PORT   # xhttp_prom's /metrics

    def start(self, timeout=30):
        env = dict(os.environ, PWD=ROOT, KAZOO_GREEN_CTL=CTL, KAZOO_GREEN_NODE=self.node,
                   KAZOO_GREEN_HTTP_PORT=str(self.http_port))
        env.update(self.env)
        self._log = open(self.log_path, 'a')
        self.proc = subprocess.Popen(['kamailio', '-f', self.cfg, '-DD', '-E', '-m', '256'],
                                     cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        # Ready once two processes (the kazoo_resumer ones in the example) read the
        # resume queue.
        async_queue = '%s-resume' % self.node
        ready = wait_until(lambda: self.proc.poll() is not None or (
            'consume link: connected' in self.log()
            and self.queues().get(async_queue, (0, 0))[0] >= 2), timeout)
        if not ready or self.proc.poll() is not None:
            raise RuntimeError('Kamailio did not start; see %s' % self.log_path)
        time.sleep(0.5)
        self.pids = self.process_ids()

    def log(self):
        with open(self.log_path, errors='replace') as f:
            return f.read()

    def process_ids(self):
        """The main process and all its children."""
        if self.proc is None or self.proc.poll() is not None:
            return set()
        out = subprocess.run(['ps', '-o', 'pid=', '--ppid', str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return {self.proc.pid} | {int(p) for p in out.split()}

    def health(self):
        """None if Kamailio runs with every process it started with, else what is wrong."""
        if self.proc is None or self.proc.poll() is not None:
            return 'Kamailio exited with %s' % (self.proc and self.proc.returncode)
        now = self.process_ids()
        if now != self.pids:
            return 'Kamailio processes changed: lost %s, new %s' % (
                sorted(self.pids - now), sorted(now - self.pids))
        crash = re.search(r'.*(signal 11|core dump|segfault|terminated by signal).*', self.log())
        if crash:
            return 'crash in the log: %s' % crash.group(0)
        return None

    def _sum_over_processes(self, read):
        """Sum ``read(pid)`` over every Kamailio process (ones gone meanwhile count 0)."""
        total = 0
        for pid in self.process_ids():
            try:
                total += read(pid)
            except (OSError, IndexError, ValueError):
                pass
        return total

    def cpu_ticks(self):
        """utime+stime (clock ticks) summed over all Kamailio processes."""
        def ticks(pid):
            with open('/proc/%d/stat' % pid) as f:
                fields = f.read().rsplit(')', 1)[1].split()
            return int(fields[11]) + int(fields[12])
        return self._sum_over_processes(ticks)

    def rss_kb(self):
        """Resident memory (kB) summed over all Kamailio processes."""
        def rss(pid):
            with open('/proc/%d/status' % pid) as f:
                for line in f:
                    if line.startswith('VmRSS:'):
                        return int(line.split()[1])
            return 0
        return self._sum_over_processes(rss)

    def kamcmd(self, *args):
        return subprocess.run(['kamcmd', '-s', CTL] + list(args), capture_output=True,
                              text=True, timeout=10)

    def statistics(self, group='kazoo_green'):
        """``kamcmd stats.get_statistics <group>:`` as {name: int}."""
        out = self.kamcmd('stats.get_statistics', group + ':')
        assert out.returncode == 0, out
        values = {}
        for line in out.stdout.splitlines():
            name, sep, value = line.partition(' = ')
            if sep:
                values[name.split(':', 1)[1].strip()] = int(value)
        return values

    def metrics(self):
        """xhttp_prom's /metrics, scraped over HTTP: {(name, ((label, value), ...)): value}."""
        import urllib.request
        from prometheus_client.parser import text_string_to_metric_families
        url = 'http://127.0.0.1:%s/metrics' % self.http_port
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            text = response.read().decode('utf-8')
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


# -- sipp ----------------------------------------------------------------------

_INVITE = '''<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="invite">
  <send start_txn="invite" start_rtd="1">
    <![CDATA[

      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:caller@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:caller@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="100" optional="true" response_txn="invite"/>
%(recvs)s
  <label id="ack"/>
  <send ack_txn="invite">
    <![CDATA[

      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch-%(ack_back)d]
      From: sipp <sip:caller@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
</scenario>
'''

_REGISTER = '''<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="register">
  <send start_rtd="1">
    <![CDATA[

      REGISTER sip:%(domain)s SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:[service]@%(domain)s>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@%(domain)s>
      Call-ID: [call_id]
      CSeq: 1 REGISTER
      Contact: <sip:[service]@[local_ip]:[local_port]>
      Expires: 3600
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200" rtd="1"/>
</scenario>
'''


def invite_scenario(user, *codes):
    """An INVITE that must end with one of ``codes``; a 302 must carry the right Contact."""
    recvs = []
    for i, code in enumerate(codes):
        last = i == len(codes) - 1
        attrs = 'response="%s" rtd="1" response_txn="invite"' % code
        if not last:
            attrs += ' optional="true" next="ack"'
        if str(code) == '302':
            recvs.append(
                '  <recv %s>\n    <action>\n      <ereg regexp="^ *&lt;sip:%s@127\\.0\\.0\\.1:5090&gt;'
                '" search_in="hdr" header="Contact:" check_it="true" assign_to="1"/>\n'
                '    </action>\n  </recv>\n  <Reference variables="1"/>'
                % (attrs, re.escape(user)))
        else:
            recvs.append('  <recv %s/>' % attrs)
    # The ACK of a non-2xx final reply is part of the INVITE transaction: same branch
    # (RFC 3261 17.1.1.3), or tm cannot match it and retransmits the reply until its
    # timer. [branch-N] is the branch of the message N scenario messages back: the
    # INVITE, the optional 100 and one recv per code come before the ACK.
    return _INVITE % {'recvs': '\n'.join(recvs), 'ack_back': 2 + len(codes)}


def register_scenario(domain):
    return _REGISTER % {'domain': domain}


class SippResult(object):
    def __init__(self, returncode, counts, successful, failed, response_ms, output,
                 completed_ms=()):
        self.returncode = returncode
        self.counts = counts            # {'302': n, ...} responses received, by code
        self.successful = successful
        self.failed = failed
        self.response_ms = response_ms  # per call, in order of completion
        # when each of those calls completed: sipp's clock in ms (the rtt file's Date_ms)
        self.completed_ms = list(completed_ms)
        self.output = output

    def percentile(self, p):
        values = sorted(self.response_ms)
        if not values:
            return None
        return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]

    def __repr__(self):
        return '<sipp rc=%s ok=%s failed=%s counts=%s p50=%s p99=%s>' % (
            self.returncode, self.successful, self.failed, self.counts, self.percentile(50),
            self.percentile(99))


_port = [5070]


def run_sipp(scenario_xml, user, calls, rate, max_seconds=120, limit=None, extra=()):
    """Run one sipp client to completion and parse its results."""
    _port[0] = 5071 + (_port[0] - 5070) % 200
    port = _port[0]
    workdir = tempfile.mkdtemp(prefix='kgsipp-')
    path = os.path.join(workdir, 'scenario.xml')
    with open(path, 'w') as f:
        f.write(scenario_xml)
    cmd = ['sipp', '127.0.0.1:%d' % SIP_PORT, '-sf', path, '-s', user, '-i', '127.0.0.1',
           '-p', str(port), '-m', str(calls), '-r', str(rate), '-l', str(limit or rate * 5),
           '-timeout', '%ds' % max_seconds, '-timeout_error', '-recv_timeout', '10000',
           '-nostdin', '-trace_screen', '-trace_err', '-trace_rtt', '-rtt_freq', '1'] + list(extra)
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          timeout=max_seconds + 30)
    result = _parse(workdir, proc)
    result.workdir = workdir
    return result


def log_evidence(path, patterns=(r'link: (lost|connected|cannot)', r'cannot set up',
                                    r'set up again', r'route\.req for ', r'Traceback'),
                 limit=12):
    """The lines of log ``path`` that say what a failover did (each pattern's count and its
    first ``limit`` lines, ``route.req for <user>: <reason>`` grouped by reason), for a
    failing test to print: what CI shows is all there is to go on."""
    import collections
    found = collections.OrderedDict((p, []) for p in patterns)
    reasons = collections.Counter()
    try:
        with open(path, errors='replace') as f:
            for line in f:
                for p in patterns:
                    if re.search(p, line):
                        found[p].append(line.rstrip())
                        if 'route\\.req' in p:
                            reasons[re.sub(r'.*route\.req for \S+: ', '', line.rstrip())] += 1
    except OSError as exc:
        return '%s: %s' % (path, exc)
    out = ['--- %s' % path]
    for p, lines in found.items():
        if lines and 'route\\.req' not in p:
            out.append('%d x /%s/:' % (len(lines), p))
            out.extend('  ' + line[-240:] for line in lines[:limit])
    for reason, n in reasons.most_common(limit):
        out.append('%d x route.req failed: %s' % (n, reason[-240:]))
    return '\n'.join(out)


_STAMP = re.compile(r'(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\s*$')


def received_at(workdir, status):
    """Wall-clock times (epoch seconds) at which responses with ``status`` arrived, from
    the message trace of a run made with ``extra=('-trace_msg',)``."""
    import datetime
    times = []
    for name in os.listdir(workdir):
        if not name.endswith('_messages.log'):
            continue
        stamp = None
        with open(os.path.join(workdir, name), errors='replace') as f:
            for line in f:
                found = _STAMP.search(line) if line.startswith('-----') else None
                if found:
                    stamp = found.group(1)
                elif stamp and line.startswith('SIP/2.0 %s ' % status):
                    times.append(datetime.datetime.strptime(
                        stamp, '%Y-%m-%d %H:%M:%S.%f').timestamp())
                    stamp = None
                elif line.strip():
                    if not line.startswith('UDP message'):
                        stamp = None
    return sorted(times)


def _parse(workdir, proc):
    screen, rtt, at = '', [], []
    for name in os.listdir(workdir):
        full = os.path.join(workdir, name)
        if name.endswith('_screen.log'):
            with open(full, errors='replace') as f:
                screen = f.read()
        elif name.endswith('_rtt.csv'):
            with open(full) as f:
                for line in f:
                    parts = line.strip().split(';')
                    if len(parts) >= 2:
                        try:
                            rtt.append(float(parts[1]))
                            at.append(float(parts[0]))
                        except ValueError:
                            pass
    counts = {}
    for code, n in re.findall(r'^\s+(\d{3}) <-+\s+(?:[BE]-RTD\d+\s+)?(\d+)', screen, re.M):
        counts[code] = counts.get(code, 0) + int(n)
    ok = re.search(r'Successful call\s+\|\s+\d+\s+\|\s+(\d+)', screen)
    bad = re.search(r'Failed call\s+\|\s+\d+\s+\|\s+(\d+)', screen)
    return SippResult(proc.returncode, counts, int(ok.group(1)) if ok else 0,
                      int(bad.group(1)) if bad else 0, rtt,
                      proc.stdout[-3000:] + proc.stderr[-3000:] + screen[-4000:], at)


def spawn_sipp(scenario_xml, user, calls, rate, max_seconds=120, limit=None, extra=()):
    """Like run_sipp, in a greenlet-free way: returns a function that waits and parses."""
    import threading
    box = {}

    def target():
        box['result'] = run_sipp(scenario_xml, user, calls, rate, max_seconds, limit, extra)

    thread = threading.Thread(target=target)
    thread.start()

    def wait():
        thread.join()
        return box['result']
    return wait


if __name__ == '__main__':
    sys.exit('a library for tests/e2e and bench/, not a program')
