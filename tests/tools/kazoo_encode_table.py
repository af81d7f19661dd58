"""Record what the real C ``kazoo`` module's ``kazoo_encode`` does, as a table.

    python tests/tools/kazoo_encode_table.py --out tests/data/kazoo_encode_table.json

Needs Debian's ``kamailio`` and ``kamailio-kazoo-modules`` and a RabbitMQ on
127.0.0.1:5672 (guest/guest): the module does not load without an
``amqp_connection``; nothing is published.

How: a throwaway kamailio.cfg whose ``event_route[kazoo:mod-init]`` (run once, at
start, before any SIP traffic) does, for every input::

    $var(in) = $(var(h){s.decode.hexa});      # h: the input's bytes as hex
    kazoo_encode("$var(in)", "$var(out)");    # the function
    $var(t) = $(var(in){kz.encode});          # the module's transformation too

and logs ``$rc`` and both results as hex with ``xlog`` on stderr, which this script
parses. Hex both ways, so every byte (NUL, controls, ``"``, ``\\``, ``$``, ``%``, bytes
0x80-0xff that are not UTF-8) reaches the C code and comes back byte-exact; the input
is also logged back (as Kamailio holds it) and checked against what was meant.

Anything the module logs between one input's start and its result is kept with the
entry. If Kamailio dies on an input (the encoder writes past its stack buffer near
the length limit), that entry says so and the remaining inputs run in a new Kamailio.

The output is deterministic for a given Kamailio build, except for ``date``.
"""

import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

KAMAILIO = os.environ.get('KAMAILIO', '/usr/sbin/kamailio')
MODULES_DIR = '/usr/lib/x86_64-linux-gnu/kamailio/modules'
AMQP_URL = 'amqp://guest:guest@127.0.0.1:5672'
UNSET = b'<<unset>>'      # '<' is never written by the encoder: tells "not set" apart
LIMIT = 255               # MAX_ROUTING_KEY_SIZE, src/modules/kazoo/defs.h


def build_inputs():
    """[(bytes, note)] in a fixed order, no duplicates."""
    out = []
    seen = set()

    def add(value, note=None):
        if isinstance(value, str):
            value = value.encode('utf-8')
        if value in seen:
            return
        seen.add(value)
        out.append((value, note))

    for s in ('', '#', '*', '##', '#*', '*#', '**', 'a#b', 'a*b', '*.b', '#.b', 'a.#',
              'a.b c/d~_-@*', 'sip.example.com', 'a b@c', ' ', '  ', '%', '%2E', '+'):
        add(s, 'special')
    for b in range(0x20, 0x7f):
        add(bytes([b]), 'single printable ASCII')
    for b in range(0x01, 0x100):
        add(bytes([b]), 'single byte (raw, not UTF-8)' if b >= 0x80 else 'single byte')
    add(b'\x00', 'single NUL byte (extra)')
    add(b'a\x00b', 'embedded NUL (extra)')
    for s in ('é', 'user@sip.example.com', 'ünïcödé.test', 'Ω', '日本', '€', '😀',
              'müller@example.com', 'caf\u00e9 au lait', 'e\u0301'):
        add(s, 'UTF-8 text')
    add('é'.encode('latin-1'), 'Latin-1 é (not UTF-8)')
    add(b'\xc3', 'truncated UTF-8')

    # Around the length limit on the input (the function refuses len > LIMIT).
    for n in range(LIMIT - 2, LIMIT + 3):
        add(b'a' * n, 'input length %d (limit %d)' % (n, LIMIT))
        add(b'.' * n, 'input length %d of "." (encoded x3)' % n)
    # Encoded length crossing the limit: the loop stops once >= LIMIT bytes are
    # written, but an escape writes 3 at once.
    for n in (83, 84, 85, 86, 87):
        add(b'.' * n, '%d "." -> %d encoded' % (n, 3 * n))
    for prefix in (b'a', b'aa', b'aaa'):
        for n in (83, 84, 85):
            add(prefix + b'.' * n, '%d+%d: escape crossing the limit' % (len(prefix), n))
            add(prefix + b'@' * n, '%d+%d "@": escape crossing the limit' % (len(prefix), n))
    for k in (252, 253, 254, 255):
        add(b'a' * k + b'.', '%d plain + "." (escape at output offset %d)' % (k, k))
        add(b'a' * k + b' ', '%d plain + " "' % k)
        add(b'a' * k + b'.b', '%d plain + ".b"' % k)
    for n in (42, 43, 44, 85, 86):
        add('é'.encode() * (n // 2) + (b'x' if n % 2 else b''),
            'UTF-8 é x%d (%d bytes)' % (n // 2, len('é'.encode() * (n // 2)) + n % 2))
    add(b'a' * 170 + b'.' * 85, '255 input bytes -> 425 encoded')
    add(b'user@sip.example.com.' * 12 + b'abc', '255 bytes mixed')

    # Long ones.
    for n in (300, 1000, 5000):
        add(b'a' * n, 'long: %d "a"' % n)
        add((b'user@sip.example.com ' * (n // 21 + 1))[:n], 'long: %d mixed' % n)
    return out


def cfg_text(port, inputs, start):
    lines = [
        '#!KAMAILIO',
        'debug=2',
        'log_stderror=yes',
        'children=1',
        'auto_aliases=no',
        'listen=udp:127.0.0.1:%d' % port,
        'mpath="%s/"' % MODULES_DIR,
        'loadmodule "tm.so"',
        'loadmodule "pv.so"',
        'loadmodule "xlog.so"',
        'loadmodule "kazoo.so"',
        'modparam("xlog", "buf_size", 65536)',
        'modparam("kazoo", "amqp_connection", "%s")' % AMQP_URL,
        'modparam("kazoo", "node_hostname", "kz-encode-table.localhost")',
        'modparam("kazoo", "pua_mode", 0)',
        'modparam("kazoo", "amqp_consumer_processes", 0)',
        'request_route { drop; }',
        'event_route[kazoo:mod-init] {',
    ]
    for i in range(start, len(inputs)):
        value = inputs[i][0]
        if value:
            lines.append('  $var(h) = "%s";' % value.hex())
            lines.append('  $var(in) = $(var(h){s.decode.hexa});')
        else:
            lines.append('  $var(in) = "";')
        lines += [
            '  xlog("L_ALERT", "KGBEGIN|%d|$(var(in){s.encode.hexa})|\\n");' % i,
            '  $var(out) = "%s";' % UNSET.decode(),
            '  kazoo_encode("$var(in)", "$var(out)");',
            '  $var(rc) = $rc;',
            '  $var(t) = "%s";' % UNSET.decode(),
            '  $var(t) = $(var(in){kz.encode});',
            '  xlog("L_ALERT", "KGENC|%d|$var(rc)|$(var(out){s.encode.hexa})|'
            '$(var(t){s.encode.hexa})|\\n");' % i,
        ]
    lines += ['  xlog("L_ALERT", "KGDONE|\\n");', '}', '']
    return '\n'.join(lines)


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def stop(proc):
    """Stop the Kamailio this script started (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_LOG_PREFIX = re.compile(r'^\s*\d+\(\d+\) ')


def run_batch(tmp, inputs, start, timeout=60):
    """Run Kamailio on inputs[start:]; returns ({index: result}, first_unfinished, log)."""
    cfg = os.path.join(tmp, 'kamailio-%d.cfg' % start)
    with open(cfg, 'w') as f:
        f.write(cfg_text(free_udp_port(), inputs, start))
    check = subprocess.run([KAMAILIO, '-c', '-M', '256', '-f', cfg], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit('kamailio -c failed:\n' + check.stderr[-4000:])
    proc = subprocess.Popen(
        [KAMAILIO, '-f', cfg, '-DD', '-E', '-m', '64', '-M', '256',
         '-Y', tmp, '-P', os.path.join(tmp, 'kamailio.pid')],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    results = {}
    current = None
    pending_log = []
    log = []
    done = False
    deadline = time.monotonic() + timeout
    try:
        for raw in proc.stderr:
            line = raw.decode('utf-8', 'replace').rstrip('\n')
            log.append(line)
            body = _LOG_PREFIX.sub('', line)
            m = re.search(r'KGBEGIN\|(\d+)\|([0-9a-f]*)\|', line)
            if m:
                current = int(m.group(1))
                pending_log = []
                results[current] = {'echo_hex': m.group(2)}
                continue
            m = re.search(r'KGENC\|(\d+)\|(-?\d+)\|([0-9a-f]*)\|([0-9a-f]*)\|', line)
            if m:
                i = int(m.group(1))
                results[i].update(rc=int(m.group(2)), out=m.group(3), trans=m.group(4),
                                  log=pending_log)
                current = None
                continue
            if 'KGDONE|' in line:
                done = True
                break
            if current is not None:
                pending_log.append(body)
            if time.monotonic() > deadline:
                break
    finally:
        stop(proc)
        rest = proc.stderr.read().decode('utf-8', 'replace').splitlines()
        log += rest
        if current is not None:
            pending_log += [_LOG_PREFIX.sub('', l) for l in rest]
        proc.stderr.close()
    finished = {i: r for i, r in results.items() if 'rc' in r}
    if done:
        return finished, None, log, proc.returncode
    nxt = current if current is not None else start + len(finished)
    if current is not None:
        finished[current] = dict(results[current], crashed=True, log=pending_log)
    return finished, nxt, log, proc.returncode


def kamailio_version():
    v = subprocess.run([KAMAILIO, '-v'], capture_output=True, text=True).stdout
    first = v.splitlines()[0] if v else ''
    pkg = subprocess.run(['dpkg-query', '-W', '-f', '${Version}', 'kamailio-kazoo-modules'],
                         capture_output=True, text=True).stdout.strip()
    return first, pkg


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default='-', help='JSON file to write (default: stdout)')
    args = ap.parse_args(argv)

    inputs = build_inputs()
    results = {}
    crashes = []
    with tempfile.TemporaryDirectory(prefix='kz-encode-') as tmp:
        start = 0
        while start is not None and start < len(inputs):
            got, nxt, log, rc = run_batch(tmp, inputs, start)
            results.update(got)
            if nxt is None:
                break
            if nxt not in got:
                raise SystemExit('Kamailio stopped before input %d (rc %s):\n%s'
                                 % (nxt, rc, '\n'.join(log[-40:])))
            crashes.append((nxt, rc))
            results[nxt]['exit'] = rc
            start = nxt + 1

    unset = UNSET.hex()
    entries = []
    for i, (value, note) in enumerate(inputs):
        r = results[i]
        if r['echo_hex'] != value.hex() and len(value.hex()) < 60000:
            raise SystemExit('input %d did not reach Kamailio intact: %s != %s'
                             % (i, r['echo_hex'], value.hex()))
        e = {'input_hex': value.hex()}
        if r.get('crashed'):
            e['output_hex'] = None
            e['crashed'] = True
            e['kamailio_exit'] = r.get('exit')
        else:
            e['output_hex'] = None if r['out'] == unset else r['out']
            e['rc'] = r['rc']
            e['transformation_output_hex'] = None if r['trans'] == unset else r['trans']
        try:
            text = value.decode('ascii')
            if text.isprintable():
                e['input'] = text
        except UnicodeDecodeError:
            pass
        if e.get('output_hex') is not None:
            e['output'] = bytes.fromhex(e['output_hex']).decode('latin-1')
        e['input_len'] = len(value)
        if e.get('output_hex') is not None:
            e['output_len'] = len(e['output_hex']) // 2
        if note:
            e['note'] = note
        logs = [l for l in r.get('log', []) if l.strip()]
        if logs:
            e['log'] = logs
        entries.append(e)

    version, pkg = kamailio_version()
    doc = {
        'about': 'kazoo_encode(input, "$var(out)") of the C kazoo module, per input: '
                 'output_hex is $var(out) after the call (null: not set), rc the '
                 'function\'s return code ($rc), transformation_output_hex the value '
                 'of $(var(in){kz.encode}) (null: transformation failed). '
                 'Generated by tests/tools/kazoo_encode_table.py.',
        'kamailio_version': version,
        'kazoo_module_package': 'kamailio-kazoo-modules ' + pkg,
        'max_routing_key_size': LIMIT,
        'date': datetime.date.today().isoformat(),
        'count': len(entries),
        'entries': entries,
    }
    text = json.dumps(doc, indent=1, ensure_ascii=False) + '\n'
    if args.out == '-':
        sys.stdout.write(text)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            f.write(text)
        print('%d entries written to %s%s' % (
            len(entries), args.out,
            ' (Kamailio died on inputs %s)' % [c[0] for c in crashes] if crashes else ''),
            file=sys.stderr)


if __name__ == '__main__':
    main()
