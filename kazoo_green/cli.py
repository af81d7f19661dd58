"""``kazoo-green``: drive and inspect the bus from a shell (also ``python -m kazoo_green``).

Exit status: 0 done; 1 the broker or the other side said no (timeout, unroutable,
unknown exchange, refused); 2 bad usage or bad input (nothing was sent); 3 no broker
reachable (``health --kamailio``: Kamailio's statistics unreadable); 4 ``health``: a zone
without any broker up (``--kamailio``: a connection Kamailio's consumer processes keep is
down, or none is up).
"""

import argparse
import json
import logging
import os
import signal
import sys

import kazoo_green
from kazoo_green import (
    Kazoo, KazooError, NotConnected, PublishNacked, QueryTimeout, UnknownExchange, Unroutable,
)

from . import _defaults as D, _tls
from ._failover import safe_url
from ._link import Link
from ._stats import Stats
from ._topology import parse_topology
from .wire import to_payload

__all__ = ['main']

OK, FAILED, USAGE, NO_BROKER, UNHEALTHY = 0, 1, 2, 3, 4

EXAMPLES = """examples:
  kazoo-green publish registrar registration.flush.example%%2Ecom \\
      '{"Event-Category": "directory", "Event-Name": "reg_flush", "Username": "alice"}'
  kazoo-green query callmgr route.req '{"Event-Category": "route", "Event-Name": "req",
      "To": "bob"}' --timeout 2
  kazoo-green listen presence 'dialog.*.*' 'update.#' --type topic --count 10
  kazoo-green health --broker amqp://guest:guest@10.0.0.1:5672// \\
      --broker 'zone=dc2;amqp://guest:guest@10.1.0.1:5672//'
  kazoo-green demo

Brokers: --broker (repeatable; 'zone=NAME;URL' entries as the C module's
amqp_connection), else $KAZOO_GREEN_BROKERS, else %s. TLS: amqps:// URLs, --ssl, or
$KAZOO_GREEN_AMQPS_CA_CERT/_CERT/_KEY/_VERIFY_PEER/_VERIFY_HOSTNAME.
""" % D.BROKERS


class _Fail(Exception):
    def __init__(self, status, text):
        super().__init__(text)
        self.status = status


def _err(text):
    sys.stderr.write('kazoo-green: %s\n' % text)
    sys.stderr.flush()


def _json_line(value):
    return json.dumps(value, ensure_ascii=False, default=_jsonable, separators=(', ', ': '))


def _jsonable(value):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode('utf-8', 'replace')
    return str(value)


# -- options shared by the verbs ------------------------------------------------------------

def _connection_options(parser):
    g = parser.add_argument_group('connection')
    g.add_argument('--broker', action='append', metavar='URL',
                   help="broker URL, repeatable; 'zone=NAME;URL' puts it in zone NAME "
                        "(default: $KAZOO_GREEN_BROKERS, else %s)" % D.BROKERS)
    g.add_argument('--zone', help='the primary zone (default: local, else the first)')
    g.add_argument('--standalone', action='store_true',
                   help="a zone's brokers are independent servers, not a cluster")
    g.add_argument('--ssl', action='store_true', help='TLS for every broker')
    g.add_argument('--ca-cert', help='CA certificates file (implies --ssl)')
    g.add_argument('--cert', help='client certificate file (implies --ssl)')
    g.add_argument('--key', help='client key file')
    g.add_argument('--no-verify-peer', action='store_true', help="don't verify the broker")
    g.add_argument('--no-verify-hostname', action='store_true',
                   help="verify the certificate, not the host name")
    g.add_argument('--connect-timeout', type=float, default=D.CONNECT_TIMEOUT,
                   metavar='S', help='seconds per broker attempt (default %(default)s)')
    g.add_argument('--app-name', default='kazoo-green-cli', help='App-Name stamped')
    g.add_argument('-v', '--verbose', action='store_true', help='show the log on stderr')


def _brokers(args):
    if args.broker:
        return args.broker
    return os.environ.get('KAZOO_GREEN_BROKERS') or D.BROKERS


def _ssl(args):
    env = _tls.from_env()
    if not (args.ssl or args.ca_cert or args.cert or args.key or args.no_verify_peer
            or args.no_verify_hostname):
        return env
    opts = dict(env) if isinstance(env, dict) else {}
    if args.ca_cert:
        opts['ca_certs'] = args.ca_cert
    if args.cert:
        opts['certfile'] = args.cert
    if args.key:
        opts['keyfile'] = args.key
    if args.no_verify_peer:
        import ssl
        opts['cert_reqs'] = ssl.CERT_NONE
    if args.no_verify_hostname:
        opts['check_hostname'] = False
    return opts or True


def _runtime(args, **kwargs):
    try:
        return Kazoo(_brokers(args), zone=args.zone, app_name=args.app_name,
                     connect_timeout=args.connect_timeout, ssl=_ssl(args),
                     shape='standalone' if args.standalone else 'cluster', **kwargs)
    except (ValueError, TypeError) as exc:
        raise _Fail(USAGE, str(exc)) from None


def _payload(text):
    """The JSON argument (``-``: standard input), checked before anything is sent."""
    if text == '-':
        text = sys.stdin.read()
    try:
        return to_payload(text)
    except kazoo_green.InvalidPayload as exc:
        raise _Fail(USAGE, 'bad JSON argument: %s' % exc) from None


def _headers(pairs):
    headers = {}
    for pair in pairs or ():
        key, sep, value = pair.partition('=')
        if not sep or not key:
            raise _Fail(USAGE, 'bad --header %r: expected KEY=VALUE' % pair)
        headers[key] = value
    return headers or None


def _connect(kz, timeout):
    try:
        kz.connect(timeout)
    except NotConnected as exc:
        raise _Fail(NO_BROKER, 'no broker reachable: %s' % exc) from None


def _failure(exc):
    if isinstance(exc, NotConnected):    # ConnectionLost included
        return _Fail(NO_BROKER, 'no broker: %s' % exc)
    if isinstance(exc, QueryTimeout):
        return _Fail(FAILED, 'timeout: %s' % exc)
    if isinstance(exc, Unroutable):
        return _Fail(FAILED, 'unroutable: %s' % exc)
    if isinstance(exc, UnknownExchange):
        return _Fail(FAILED, 'unknown exchange: %s' % exc)
    if isinstance(exc, PublishNacked):
        return _Fail(FAILED, 'refused by the broker: %s' % exc)
    return _Fail(FAILED, '%s: %s' % (type(exc).__name__, exc))


# -- verbs -------------------------------------------------------------------------------------

def _send(args, call):
    """The shared part of publish and query: check the JSON and headers, connect, then
    ``call(kz, payload, headers)``; its result is printed (KazooError: a _Fail)."""
    payload = _payload(args.json)
    headers = _headers(args.header)
    kz = _runtime(args)
    try:
        _connect(kz, args.timeout)
        try:
            out = call(kz, payload, headers)
        except KazooError as exc:
            raise _failure(exc) from None
        print(out)
        return OK
    finally:
        kz.stop(timeout=1)


def cmd_publish(args):
    def publish(kz, payload, headers):
        msg_id = kz.publish(args.exchange, args.routing_key, payload, headers=headers,
                            confirm=args.confirm, timeout=args.timeout,
                            persistent=args.persistent)
        if kz.stats()['buffer_size']:
            raise _Fail(NO_BROKER, 'connection lost before the message was written')
        return msg_id
    return _send(args, publish)


def cmd_query(args):
    return _send(args, lambda kz, payload, headers: _json_line(kz.query(
        args.exchange, args.routing_key, payload, timeout=args.timeout, headers=headers)))


def cmd_listen(args):
    import gevent
    from gevent.event import Event
    kz = _runtime(args, workers=1)
    done = Event()
    count = [0]

    def show(payload, meta):
        if meta.exchange is None:    # a connection event
            if args.verbose:
                _err('%s %s %s (zone %s)' % (payload.get('Link'), payload.get('Event-Name'),
                                             payload.get('Host'), payload.get('zone')))
            return
        if done.is_set():
            return
        print(_json_line({'exchange': meta.exchange, 'routing_key': meta.routing_key,
                          'zone': meta.zone, 'broker': meta.broker,
                          'redelivered': meta.redelivered, 'headers': meta.headers,
                          'body': payload}))
        sys.stdout.flush()
        count[0] += 1
        if args.count and count[0] >= args.count:
            done.set()

    kz.add_route(D.ROUTE_PREFIX, show)
    try:
        sub = kz.subscribe(args.exchange, args.binding, exchange_type=args.type,
                           federate=args.federate, ack='early', queue=args.queue,
                           auto_delete=True if args.queue else None)
    except ValueError as exc:
        raise _Fail(USAGE, str(exc)) from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, done.set)
    kz.start()
    try:
        # Told on stderr once every copy is consuming (the primary zone's, or every zone's
        # with --federate): from then on nothing is missed.
        consuming = lambda: all(c.channel is not None for c in sub.copies)  # noqa: E731
        brokers = max(len(z.urls) for z in kz.zones.values())
        _wait(lambda: consuming() or kz.stats()['setup_errors'],
              args.connect_timeout * brokers + 5)
        if not consuming():
            if kz.stats()['setup_errors']:
                raise _Fail(FAILED, 'the broker refused the subscription (see -v; no --type '
                                    'for an exchange that does not exist?): %r' % sub)
            raise _Fail(NO_BROKER, 'no broker reachable: %s' % ', '.join(
                '%s %s %s' % (link['zone'], link['role'], link['brokers'])
                for link in kz.links() if link['role'] == 'consume' and not link['connected']))
        _err('listening on %s %s (queue %s%s)' % (args.exchange, ' '.join(args.binding),
                                                 sub.queue_in_use,
                                                 ', federated' if args.federate else ''))
        done.wait()
        return OK
    finally:
        kz.stop(timeout=1)


def _wait(predicate, timeout):
    import gevent
    with gevent.Timeout(timeout, False):
        while not predicate():
            gevent.sleep(0.01)
    return predicate()


def cmd_health(args):
    """Each broker of each zone, connected to on its own (TCP, TLS, AMQP); or, with
    ``--kamailio``, a running Kamailio's own view (its kazoo_green statistics)."""
    if args.kamailio:
        return _kamailio_health(args)
    try:
        zones, primary = parse_topology(_brokers(args), args.zone)
    except ValueError as exc:
        raise _Fail(USAGE, str(exc)) from None
    ssl = _ssl(args)
    report = {}
    import gevent
    jobs = []
    for name, spec in zones.items():
        for url in spec.urls:
            jobs.append((name, url, gevent.spawn(_probe_broker, url, ssl, args)))
    gevent.joinall([job for _, _, job in jobs])
    for name, url, job in jobs:
        error = job.value
        report.setdefault(name, []).append(error is None)
        print('%-8s %-40s %s' % (name, safe_url(url), 'up' if error is None
                                 else 'DOWN: %s' % error))
    down = [name for name, states in report.items() if not any(states)]
    if down:
        _err('no broker up in zone %s' % ', '.join(down))
        return UNHEALTHY
    return OK


def _kamailio_health(args):
    """Healthy when every connection Kamailio's consumer processes keep is up (links_down 0,
    links_up > 0), read with ``kamcmd stats.get_statistics kazoo_green:``."""
    import subprocess
    from ._kamstats import GROUP
    cmd = [args.kamcmd] + (['-s', args.kamcmd_socket] if args.kamcmd_socket else []) + [
        'stats.get_statistics', GROUP + ':']
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise _Fail(NO_BROKER, 'cannot ask Kamailio (%s): %s' % (' '.join(cmd), exc)) from None
    values = {}
    for line in done.stdout.splitlines():
        name, sep, value = line.partition(' = ')
        if sep and name.startswith(GROUP + ':'):
            try:
                values[name[len(GROUP) + 1:].strip()] = int(value)
            except ValueError:
                pass
    if done.returncode != 0 or 'links_up' not in values:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise _Fail(NO_BROKER, 'no kazoo_green statistics from Kamailio (%s): %s' % (
            ' '.join(cmd), why[-1] if why else 'exit %d' % done.returncode))
    for name in ('links_up', 'links_down', 'pending_queries', 'buffered_publishes',
                 'queries', 'queries_ok', 'queries_timeout', 'queries_failed',
                 'consumed', 'bad_input', 'handler_errors', 'reconnects'):
        print('%-20s %s' % (name, values.get(name, '?')))
    if values['links_down'] or not values['links_up']:
        _err('%d connection(s) down, %d up' % (values['links_down'], values['links_up']))
        return UNHEALTHY
    return OK


def _probe_broker(url, ssl, args):
    from time import monotonic
    link = Link('health', [url], Stats(), connect_timeout=args.connect_timeout,
                heartbeat=0, label=args.app_name, ssl=ssl, fast=False)
    try:
        link.connect(monotonic() + args.connect_timeout)
        return None
    except NotConnected as exc:
        return str(exc.__cause__ or exc).replace('health link: ', '')
    finally:
        link.stop(timeout=1)


def cmd_kamailio_cfg(args):
    from ._kamstats import include_cfg
    sys.stdout.write(include_cfg())
    return OK


def cmd_demo(args):
    from ._demo import demo
    return demo(args.broker_url)


# -- entry point -----------------------------------------------------------------------------

def _parser():
    parser = argparse.ArgumentParser(prog='kazoo-green', description=__doc__,
                                     epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--version', action='version', version=kazoo_green.__version__)
    sub = parser.add_subparsers(dest='command', required=True, metavar='VERB')

    def verb(name, fn, help, example):
        p = sub.add_parser(name, help=help, description=help, epilog='example:\n  ' + example,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    p = verb('publish', cmd_publish, 'publish one JSON payload; prints its Msg-ID',
             "kazoo-green publish registrar registration.flush.example%2Ecom "
             "'{\"Event-Category\": \"directory\", \"Event-Name\": \"reg_flush\"}' --confirm")
    p.add_argument('exchange')
    p.add_argument('routing_key')
    p.add_argument('json', help="a JSON object ('-': read it from standard input)")
    p.add_argument('--confirm', action='store_true', help='wait for the broker to confirm')
    p.add_argument('--persistent', action='store_true', help='delivery mode 2')
    p.add_argument('--header', action='append', metavar='K=V', help='AMQP header, repeatable')
    p.add_argument('--timeout', type=float, default=D.CONFIRM_TIMEOUT, metavar='S',
                   help='seconds for connecting and confirming (default %(default)s)')
    _connection_options(p)

    p = verb('query', cmd_query, 'publish a request, print the reply as JSON',
             "kazoo-green query callmgr route.req "
             "'{\"Event-Category\": \"route\", \"Event-Name\": \"req\", \"To\": \"bob\"}'")
    p.add_argument('exchange')
    p.add_argument('routing_key')
    p.add_argument('json', help="a JSON object ('-': read it from standard input)")
    p.add_argument('--timeout', type=float, default=D.QUERY_TIMEOUT, metavar='S',
                   help='seconds to wait for the reply (default %(default)s)')
    p.add_argument('--header', action='append', metavar='K=V', help='AMQP header, repeatable')
    _connection_options(p)

    p = verb('listen', cmd_listen, 'print each message bound as one JSON line '
                                   '(exchange, routing key, zone, headers, body)',
             "kazoo-green listen presence 'dialog.*.*' --type topic --count 5")
    p.add_argument('exchange')
    p.add_argument('binding', nargs='+', help='routing key(s) to bind')
    p.add_argument('--type', default=None, metavar='TYPE',
                   help='declare the exchange with this type (default: it must exist)')
    p.add_argument('--count', type=int, default=0, metavar='N', help='stop after N messages')
    p.add_argument('--federate', action='store_true', help='listen in every zone')
    p.add_argument('--queue', help='queue name (default: a made-up, auto-delete one)')
    _connection_options(p)

    p = verb('health', cmd_health, 'connect to every broker of every zone; exit 4 when a '
                                   'zone has none up, 0 otherwise',
             "kazoo-green health --broker 'zone=dc2;amqp://guest:guest@10.1.0.1:5672//'\n"
             "  kazoo-green health --kamailio --kamcmd-socket unix:/run/kamailio/kamailio_ctl")
    g = p.add_argument_group('Kamailio')
    g.add_argument('--kamailio', action='store_true',
                   help="ask a running Kamailio instead (its statistics, over kamcmd): "
                        "exit 4 when a connection its consumer processes keep is down")
    g.add_argument('--kamcmd', default='kamcmd', help='kamcmd binary (default %(default)s)')
    g.add_argument('--kamcmd-socket', metavar='SOCK',
                   help="kamcmd's -s (default: kamcmd's own)")
    g.add_argument('--timeout', type=float, default=10, metavar='S',
                   help='seconds for kamcmd to answer (default %(default)s)')
    _connection_options(p)

    verb('kamailio-cfg', cmd_kamailio_cfg, "print the kamailio.cfg lines declaring "
         "kazoo_green's statistics (include_file them after loadmodule)",
         'kazoo-green kamailio-cfg > /etc/kamailio/kazoo_green_stats.cfg')

    p = verb('demo', cmd_demo, 'run the demo (memory:// unless --broker)', 'kazoo-green demo')
    p.add_argument('--broker', dest='broker_url', default='memory://',
                   help='AMQP URL(s), ;-separated (default: memory://, no broker)')
    p.add_argument('-v', '--verbose', action='store_true', help='show the log')
    return parser


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, 'verbose', False)
    logging.basicConfig(level=logging.INFO if verbose else logging.CRITICAL,
                        format='%(levelname)s %(name)s: %(message)s', stream=sys.stderr)
    try:
        return args.fn(args)
    except _Fail as exc:
        _err(str(exc))
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == '__main__':
    sys.exit(main())
