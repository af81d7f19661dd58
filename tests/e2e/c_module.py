"""Debian's C ``kazoo`` module in a real Kamailio, for tests/e2e/test_c_module_interop.py.

``CKazoo`` renders tests/e2e/c_module/kamailio.cfg (a free SIP port on 127.0.0.1, a
unique node_hostname and exchanges, the subscriptions of the tests), runs Kamailio on it
and reads back the lines its event routes log. ``Broker`` talks to RabbitMQ with plain
py-amqp (exact bodies, passive checks, clean-up) without kazoo_green in the way.

Everything listens on and connects to 127.0.0.1 only.
"""

import json
import os
import re
import socket
import subprocess
import tempfile
import time
import uuid

import amqp

from . import harness

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, 'c_module', 'kamailio.cfg')
MODULES_DIR = '/usr/lib/x86_64-linux-gnu/kamailio/modules'
BROKER_HOST = '127.0.0.1:5672'
BROKER_URL = 'amqp://guest:guest@%s' % BROKER_HOST   # the C module's amqp_connection
MAX_CHANNELS = 4                                     # amqp_max_channels in the template

#: ``KGCI|<route>|<n>|<$kzE>``: what @@LOG@@ makes an event route log.
EVENT_LINE = re.compile(r'KGCI\|([^|\n]*)\|([^|\n]*)\|(.*)$', re.M)
#: ``KGCI-<WHAT>|<field>|<rest>`` lines of the SIP routes and failures.
OTHER_LINE = re.compile(r'KGCI-([A-Z]+)\|([^|\n]*)(?:\|(.*))?$', re.M)
_EVENT_ROUTE = re.compile(r'event_route\[(kazoo:consumer-event[^\]]*)\]\s*\{')


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _cfg_string(text):
    """``text`` as a double-quoted Kamailio cfg string."""
    return '"%s"' % text.replace('\\', '\\\\').replace('"', '\\"')


def consumer_event_routes(cfg_text):
    """The ``kazoo:consumer-event...`` event-route names a cfg defines, in order."""
    return _EVENT_ROUTE.findall(cfg_text)


def render(template, values, subscriptions):
    """The cfg text: ``@@NAME@@`` from ``values``, ``@@SUBSCRIBE@@`` from
    ``subscriptions`` (kazoo_subscribe JSON objects), ``@@LOG@@`` in each event route."""
    text = template.replace('@@SUBSCRIBE@@', '\n'.join(
        '    kazoo_subscribe(%s);' % _cfg_string(json.dumps(sub)) for sub in subscriptions))

    def log_route(match):
        return match.group(0).replace('@@LOG@@', 'xlog("L_ALERT", "KGCI|%s|'
                                      '$(kzE{kz.json,n})|$kzE\\n");' % match.group(1))
    text = re.sub(r'event_route\[([^\]]+)\]\s*\{[^}]*?@@LOG@@', log_route, text)
    for name, value in values.items():
        text = text.replace('@@%s@@' % name, str(value))
    left = re.findall(r'@@[A-Z_]+@@', text)
    if left:
        raise ValueError('cfg template: nothing for %s' % sorted(set(left)))
    return text


class Broker(object):
    """Plain py-amqp on the local RabbitMQ: one connection, a channel per operation."""

    def __init__(self, host=BROKER_HOST):
        self.conn = amqp.Connection(host, userid='guest', password='guest')
        self.conn.connect()

    def _channel(self):
        return self.conn.channel()

    def declare_exchanges(self, names, type='direct'):
        """As the C module declares a subscription's exchange (no flags set)."""
        ch = self._channel()
        try:
            for name in names:
                ch.exchange_declare(name, type, durable=False, auto_delete=False)
        finally:
            ch.close()

    def _each(self, method, names):
        ch = self._channel()
        try:
            for name in names:
                getattr(ch, method)(name)
        finally:
            ch.close()

    def delete_exchanges(self, names):
        self._each('exchange_delete', names)

    def delete_queues(self, names):
        self._each('queue_delete', names)

    def consumers(self, queue):
        """Consumers of ``queue``, or None if it does not exist."""
        ch = self._channel()
        try:
            return ch.queue_declare(queue, passive=True).consumer_count
        except amqp.exceptions.NotFound:
            return None
        finally:
            if ch.is_open:
                ch.close()

    def publish(self, exchange, routing_key, body):
        """Publish ``body`` (bytes or text) as it is, as Kazoo does (content type JSON)."""
        if isinstance(body, str):
            body = body.encode('utf-8')
        ch = self._channel()
        try:
            ch.basic_publish(amqp.Message(body, content_type='application/json'),
                             exchange=exchange, routing_key=routing_key)
        finally:
            ch.close()

    def close(self):
        try:
            self.conn.close()
        except Exception:
            pass


class CKazoo(harness.Kamailio):
    """Kamailio with the C kazoo module on the rendered template.

    ``subscriptions``: {name: kazoo_subscribe JSON object}; their exchanges (declared
    here beforehand, deleted by ``cleanup``) and queues must be unique names.
    """

    def __init__(self, log_path, node_hostname, exchanges, subscriptions, workdir=None):
        super(CKazoo, self).__init__(log_path, node='kamailio@%s' % node_hostname)
        self.node_hostname = node_hostname
        self.exchanges = dict(exchanges)
        self.subscriptions = dict(subscriptions)
        self.port = free_udp_port()
        self.workdir = workdir or tempfile.mkdtemp(prefix='kgci-kamailio-')
        os.makedirs(self.workdir, exist_ok=True)
        values = dict(PORT=self.port, NODE_HOSTNAME=node_hostname, BROKER=BROKER_URL)
        values.update(('EX_%s' % k, v) for k, v in self.exchanges.items())
        with open(TEMPLATE) as f:
            self.cfg_text = render(f.read(), values, list(self.subscriptions.values()))
        self.cfg_path = os.path.join(self.workdir, 'kamailio.cfg')
        with open(self.cfg_path, 'w') as f:
            f.write(self.cfg_text)
        self.routes = consumer_event_routes(self.cfg_text)
        self.broker = Broker()
        self._log_pos = 0
        self._events = []   # (route, n, payload text), in log order
        self._others = []   # (what, field, rest)

    # -- life cycle -----------------------------------------------------
    @property
    def targeted_queues(self):
        return ['kamailio@%s-<1-%d>' % (self.node_hostname, i) for i in range(MAX_CHANNELS)]

    def start(self, timeout=30):
        check = subprocess.run(['kamailio', '-c', '-f', self.cfg_path], capture_output=True,
                               text=True, cwd=self.workdir)
        if check.returncode != 0:
            raise RuntimeError('kamailio -c %s failed:\n%s' % (self.cfg_path,
                                                               check.stderr[-4000:]))
        self.broker.declare_exchanges(sorted(set(self.exchanges.values())))
        self._log = open(self.log_path, 'a')
        self.proc = subprocess.Popen(
            ['kamailio', '-f', self.cfg_path, '-DD', '-E', '-m', '64', '-M', '16',
             '-Y', self.workdir],
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT)
        queues = self.targeted_queues + [s['queue'] for s in self.subscriptions.values()]
        ready = harness.wait_until(lambda: self.proc.poll() is not None or (
            all((self.broker.consumers(q) or 0) >= 1 for q in queues)
            and self.sip_answers()), timeout)
        if not ready or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError('Kamailio with the C kazoo module did not start (queues %s '
                               'consumed?); log %s:\n%s' % (queues, self.log_path, self.tail()))
        self.pids = self.process_ids()

    def sip_answers(self):
        try:
            return sip_request(self.port, 'OPTIONS', 'ping', timeout=0.3) is not None
        except OSError:
            return False

    def cleanup(self):
        """Delete the exchanges (and queues left over, if any) this instance used."""
        try:
            self.broker.delete_queues([s['queue'] for s in self.subscriptions.values()])
            self.broker.delete_exchanges(sorted(set(self.exchanges.values())))
        finally:
            self.broker.close()

    # -- the log --------------------------------------------------------
    def tail(self, lines=60):
        try:
            return '\n'.join(self.log().splitlines()[-lines:])
        except OSError:
            return '(no log)'

    def _read(self):
        with open(self.log_path, 'rb') as f:
            f.seek(self._log_pos)
            data = f.read()
        end = data.rfind(b'\n')
        if end < 0:
            return
        self._log_pos += end + 1
        text = data[:end + 1].decode('utf-8', 'replace')
        self._events.extend(EVENT_LINE.findall(text))
        self._others.extend(OTHER_LINE.findall(text))

    def events(self, prefix=''):
        """{n: [(route, payload dict or the raw text)]} of the event-route lines so far
        whose ``n`` starts with ``prefix``."""
        self._read()
        out = {}
        for route, n, raw in self._events:
            if n and n.startswith(prefix):
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = raw
                out.setdefault(n, []).append((route, payload))
        return out

    def others(self, what):
        """[(field, rest)] of the ``KGCI-<what>|...`` lines so far."""
        self._read()
        return [(field, rest) for w, field, rest in self._others if w == what]


# -- SIP ---------------------------------------------------------------------

def sip_request(port, method, user, headers=(), timeout=5.0):
    """Send one SIP request over UDP from 127.0.0.1 to 127.0.0.1:``port``; return the
    first final reply (text), or None when none came within ``timeout``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(('127.0.0.1', 0))
        local = sock.getsockname()[1]
        tag = uuid.uuid4().hex[:12]
        lines = ['%s sip:%s@127.0.0.1:%d SIP/2.0' % (method, user, port),
                 'Via: SIP/2.0/UDP 127.0.0.1:%d;branch=z9hG4bK%s;rport' % (local, tag),
                 'From: <sip:kgci@127.0.0.1>;tag=%s' % tag,
                 'To: <sip:%s@127.0.0.1>' % user,
                 'Call-ID: %s@127.0.0.1' % tag,
                 'CSeq: 1 %s' % method,
                 'Max-Forwards: 70']
        lines += ['%s: %s' % h for h in headers]
        lines += ['Content-Length: 0', '', '']
        sock.sendto('\r\n'.join(lines).encode(), ('127.0.0.1', port))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            sock.settimeout(left)
            try:
                reply = sock.recv(65535).decode('utf-8', 'replace')
            except socket.timeout:
                return None
            if not reply.startswith('SIP/2.0 1'):
                return reply
    finally:
        sock.close()


def run_sipp(port, scenario_xml, user, calls, rate=10, max_seconds=30, workdir=None):
    """Run one sipp client against 127.0.0.1:``port``; (returncode, messages, output):
    ``messages`` is sipp's message trace (what it sent and received)."""
    workdir = workdir or tempfile.mkdtemp(prefix='kgci-sipp-')
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, 'scenario.xml')
    with open(path, 'w') as f:
        f.write(scenario_xml)
    cmd = ['sipp', '127.0.0.1:%d' % port, '-sf', path, '-s', user, '-i', '127.0.0.1',
           '-p', str(free_udp_port()), '-m', str(calls), '-r', str(rate),
           '-timeout', '%ds' % max_seconds, '-timeout_error', '-recv_timeout', '15000',
           '-nostdin', '-trace_screen', '-trace_err', '-trace_msg']
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True,
                          timeout=max_seconds + 30)
    messages = screen = ''
    for name in os.listdir(workdir):
        with open(os.path.join(workdir, name), errors='replace') as f:
            if name.endswith('_messages.log'):
                messages = f.read()
            elif name.endswith('_screen.log') or name.endswith('_errors.log'):
                screen += f.read()[-4000:]
    return proc.returncode, messages, (proc.stdout[-2000:] + proc.stderr[-2000:] + screen)


# -- the C module's route choice, modelled -----------------------------------------------
# kz_amqp_consumer_event_cfg (kz_amqp.c) builds each candidate name in a stack buffer and
# looks it up with route_get(&event_rt, buffer). route_get (core/route.c) adds every
# name it does not know to the event-route name hash, keeping the *pointer* (route_add:
# e->key.s = name), i.e. the address of that stack buffer. In the same worker process,
# a later lookup of any name with the same length in the same hash bucket (RT_HASH_SIZE
# 8, get_hash1_raw) then compares the buffer with itself, matches the stale entry and
# finds no route there: a defined route is missed. The tests' tables must therefore
# never look up an undefined name in the (length, bucket) slot of a defined one.

class CFloat(str):
    """A JSON number with a fraction or exponent, as written (json-c keeps that text)."""


def c_json_loads(text):
    return json.loads(text, parse_float=CFloat)


def c_value_text(value):
    """json_object_get_string of a field as kz_amqp_consumer_event_cfg uses it (up to the
    first NUL, as %.*s with strlen); '' for missing or null."""
    if value is None:
        return ''
    if isinstance(value, CFloat):
        return str(value)
    if isinstance(value, str):
        return value.split('\x00', 1)[0]
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return repr(value)
    return _c_spaced(value)


def _c_spaced(value):
    """json-c's JSON_C_TO_STRING_SPACED text (enough for the tests' values)."""
    if isinstance(value, dict):
        if not value:
            return '{ }'
        return '{ %s }' % ', '.join('%s: %s' % (_c_spaced(k), _c_spaced(v))
                                    for k, v in value.items())
    if isinstance(value, list):
        return '[ %s ]' % ', '.join(_c_spaced(v) for v in value) if value else '[ ]'
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace('/', '\\/')
    return c_value_text(value)


def _c_lower(name):
    """tolower() and '_' -> '-' over the bytes, ASCII only (the C locale)."""
    out = bytearray(name.encode('utf-8'))
    for i, b in enumerate(out):
        if 65 <= b <= 90:
            out[i] = b + 32
        elif b == 95:
            out[i] = 45
    return bytes(out)


def c_route_chain(payload, defined, event_key=None, event_subkey=None):
    """(chosen route or None, [every name looked up, as bytes, in order]) of the C chain
    for ``payload`` (a dict from c_json_loads), with the event routes ``defined``."""
    key = event_key or 'Event-Category'
    subkey = event_subkey or 'Event-Name'
    category = c_value_text(payload.get(key)) or event_key or ''
    name = c_value_text(payload.get(subkey)) or event_subkey or ''
    p = 'kazoo:consumer-event'
    candidates = [_c_lower('%s-%s-%s' % (p, category, name)), _c_lower('%s-%s' % (p, category)),
                  _c_lower('%s-%s-%s' % (p, key, subkey)), _c_lower('%s-%s' % (p, key)),
                  p.encode()]
    wanted = {n.encode() for n in defined}
    looked = []
    for candidate in candidates:
        looked.append(candidate)
        if candidate in wanted:
            return candidate.decode('utf-8', 'replace'), looked
    return None, looked


def _signed(b):
    return b - 256 if b >= 128 else b


def route_hash_slot(name):
    """(length, bucket) of a route name (bytes) in Kamailio's route-name hash:
    get_hash1_raw (core/hashes.h, chars signed as on x86-64) % RT_HASH_SIZE (8)."""
    m = 0xffffffff
    h = p = 0
    n = len(name)
    while p <= n - 4:
        v = ((_signed(name[p]) << 24) + (_signed(name[p + 1]) << 16)
             + (_signed(name[p + 2]) << 8) + _signed(name[p + 3])) & m
        h = (h + (v ^ (v >> 3))) & m
        p += 4
    rest = n - p
    if rest == 3:
        v = ((_signed(name[p]) << 16) + (_signed(name[p + 1]) << 8) + _signed(name[p + 2])) & m
    elif rest == 2:
        v = ((_signed(name[p]) << 8) + _signed(name[p + 1])) & m
    elif rest == 1:
        v = _signed(name[p]) & m
    else:
        v = 0
    h = (h + (v ^ (v >> 3))) & m
    return n, (((h + (h >> 11)) + ((h >> 13) + (h >> 23))) & m) % 8


def stale_slot_clashes(lookups, defined):
    """{undefined name: defined name} for undefined names (bytes) looked up that share a
    (length, bucket) slot with a defined route: where the C module would miss the
    defined one afterwards in the same worker."""
    slots = {}
    for name in defined:
        slots.setdefault(route_hash_slot(name.encode()), []).append(name)
    wanted = {n.encode() for n in defined}
    out = {}
    for name in lookups:
        if name not in wanted and route_hash_slot(name) in slots:
            out[name.decode('utf-8', 'replace')] = slots[route_hash_slot(name)]
    return out
