"""Kamailio routing over AMQP with kazoo_green (app_python3 / KEMI).

* INVITE: query ``callmgr``/``route.req``; a reply with ``Route`` answers
  ``302 Moved Temporarily`` with ``Contact: <Route>``, one without answers 404, no reply
  in time answers 503. R-URI users starting with ``async`` go through the async query
  (the transaction is suspended and resumed by the consumer process), others through
  the sync query in the SIP worker.
* REGISTER: publish ``directory``/``reg_success`` to ``registrar`` with routing key
  ``registration.success.<realm>.<user>`` (both escaped), answer 200.
* Subscription ``presence``/``update.*.*`` (late ack): the event route stores ``State``
  in htable ``presence`` under ``From`` (``kamcmd htable.get presence <From>``).

Environment: KAZOO_GREEN_BROKERS (``;``-separated URLs, ``amqps://`` for TLS, ``zone=NAME;``
before the URLs of zone NAME), KAZOO_GREEN_ZONE (the primary zone, default ``local``),
KAZOO_GREEN_SHAPE (``standalone``: a zone's brokers are independent servers, consumed
from all at once; default ``cluster``),
KAZOO_GREEN_NODE (this instance's node name, unique per Kamailio instance),
KAZOO_GREEN_SHED_LAG (seconds, ``kemi.Kazoo(shed_lag=)``: async queries are refused with
``Overloaded`` while even the quickest replies take longer; default 0.25; ``off``:
never),
KAZOO_GREEN_AMQPS_CA_CERT / _CERT / _KEY / _VERIFY_PEER / _VERIFY_HOSTNAME (TLS options,
as the C module's amqps_* parameters; see ``kazoo_green.ssl_from_env``), KAZOO_GREEN_VENV
(the virtualenv holding kazoo_green, default: the project's ``.venv``).
"""

import glob
import os
import sys


def _use_project_packages():
    """Make kazoo_green importable by the Python Kamailio embeds (see README)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    venv = os.environ.get('KAZOO_GREEN_VENV') or os.path.join(root, '.venv')
    pattern = os.path.join(venv, 'lib', 'python%d.%d' % sys.version_info[:2], 'site-packages')
    for site in glob.glob(pattern) + [root]:
        if site not in sys.path:
            sys.path.insert(0, site)


_use_project_packages()

import kazoo_green  # noqa: E402,F401  (before kombu: applies gevent's patching)
import kazoo_green.kemi as kemi  # noqa: E402
from kazoo_green import KazooError, Overloaded, encode  # noqa: E402

import KSR  # noqa: E402

def _shed_lag(value):
    """KAZOO_GREEN_SHED_LAG: seconds, ``off`` for no shedding, unset for the default."""
    if value is None or value == '':
        return kemi.SHED_LAG
    return None if value.lower() == 'off' else float(value)


kz = kemi.Kazoo(os.environ.get('KAZOO_GREEN_BROKERS', 'amqp://guest:guest@127.0.0.1:5672//'),
                app_name='kamailio', node=os.environ.get('KAZOO_GREEN_NODE') or None,
                query_timeout=float(os.environ.get('KAZOO_GREEN_QUERY_TIMEOUT', '2.0')),
                ssl=kazoo_green.ssl_from_env(),
                zone=os.environ.get('KAZOO_GREEN_ZONE') or None,
                shape=os.environ.get('KAZOO_GREEN_SHAPE') or 'cluster',
                shed_lag=_shed_lag(os.environ.get('KAZOO_GREEN_SHED_LAG')),
                # kamailio.cfg runs two kazoo_resumer processes: they resume (without
                # gevent's hub in the way); kazoo_consumer runs the event routes.
                resume_in_consumer=False)


@kz.event_route('kazoo:consumer-event-presence-update')
def presence_update(payload, meta):
    """Runs in the consumer process, on a worker greenlet."""
    KSR.htable.sht_sets('presence', str(payload['From']), str(payload['State']))


class Router(kemi.Handler):

    def ksr_request_route(self, msg):
        method = KSR.pv.get('$rm')
        if method == 'INVITE':
            return self.invite()
        if method == 'REGISTER':
            return self.register()
        if method == 'ACK':
            # ACKs of our negative replies: t_check_trans lets tm match (and absorb)
            # the ACK of a stateful reply, which stops its retransmissions.
            KSR.tm.t_check_trans()
            return 1
        KSR.sl.sl_send_reply(501, 'Not Implemented')
        return 1

    def invite(self):
        user = KSR.pv.get('$rU') or ''
        payload = {'Event-Category': 'route', 'Event-Name': 'req', 'To': user,
                   'From': KSR.pv.get('$fU'), 'Call-ID': KSR.pv.get('$ci')}
        if user.startswith('async'):
            try:
                kz.async_query('callmgr', 'route.req', payload, on_reply='route_reply',
                               on_timeout='route_timeout')
            except Overloaded:
                # Replies are resumed late: answer now, statelessly, rather than queue
                # a call that would time out.
                KSR.sl.sl_send_reply(503, 'Service Unavailable')
            except KazooError as exc:
                KSR.err('async route.req failed: %s\n' % exc)
                KSR.sl.sl_send_reply(500, 'Server Error')
            return 1
        # A transaction first: INVITE retransmissions that arrive while this worker
        # waits for the reply are absorbed by tm instead of querying again.
        if KSR.tm.t_newtran() < 0:
            KSR.sl.sl_send_reply(500, 'Server Error')
            return 1
        try:
            reply = kz.query('callmgr', 'route.req', payload)
        except KazooError as exc:
            KSR.info('route.req for %s: %s\n' % (user, exc))
            KSR.tm.t_reply(503, 'Service Unavailable')
            return 1
        self.answer(reply, KSR.tm.t_reply)
        return 1

    def ksr_xhttp_event(self, msg, evname=None):
        """HTTP on KAZOO_GREEN_HTTP: /metrics is xhttp_prom's Prometheus text."""
        if KSR.xhttp_prom.check_uri() > 0:
            KSR.xhttp_prom.dispatch()
        else:
            KSR.xhttp.xhttp_reply(404, 'Not Found', 'text/plain', 'try /metrics\n')
        return 1

    def route_reply(self, msg):
        """Resumed (t_continue) in the consumer process with the reply."""
        self.answer(kz.reply(), KSR.tm.t_reply)
        return 1

    def route_timeout(self, msg):
        """Resumed when no reply came in time (or the request could not be sent)."""
        KSR.tm.t_reply(503, 'Service Unavailable')
        return 1

    @staticmethod
    def answer(reply, send):
        route = reply.get('Route')
        if route:
            # Kamailio writes a 3xx reply's Contact from the (new) R-URI.
            KSR.pv.sets('$ru', str(route))
            send(302, 'Moved Temporarily')
        else:
            send(404, 'Not Found')

    def register(self):
        realm = KSR.pv.get('$td') or ''
        user = KSR.pv.get('$tU') or ''
        payload = {'Event-Category': 'directory', 'Event-Name': 'reg_success',
                   'Username': user, 'Realm': realm, 'Contact': KSR.pv.get('$hdr(Contact)'),
                   'Call-ID': KSR.pv.get('$ci')}
        try:
            kz.publish('registrar', 'registration.success.%s.%s' % (encode(realm), encode(user)),
                       payload)
        except KazooError as exc:
            KSR.err('registrar publish failed: %s\n' % exc)
            KSR.sl.sl_send_reply(500, 'Server Error')
            return 1
        KSR.sl.sl_send_reply(200, 'OK')
        return 1


def mod_init():
    # Before Kamailio forks: only registrations, no I/O.
    kz.subscribe('presence', 'update.*.*', exchange_type='topic', ack='late')
    return Router(kz)
