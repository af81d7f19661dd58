"""bench/compare.py's "http-async": kg-async's routing with the route fetched over HTTP.

What an operator might use instead of an AMQP query for the same decision:
http_async_client's ``query`` (GET ``$KG_BENCH_HTTP_URL<user>``, answered by
bench/http_responder.py with the JSON kazoo_green's responder sends). The SIP worker
suspends the transaction; the module's worker process resumes it in ``http_reply``.
Same answers as examples/kamailio/router.py: ``Route`` -> 302, none -> 404, an HTTP error
or timeout -> 503.
"""

import json
import os
from urllib.parse import quote

import KSR
from floor import Floor

URL = os.environ.get('KG_BENCH_HTTP_URL', 'http://127.0.0.1:8091/route/')


class HttpRouter(Floor):
    """floor.py's transaction handling; the INVITE answered after the HTTP request."""

    def invite(self):
        # quote(): the URL is a pseudo-variable format; no '$' may reach it.
        if KSR.http_async_client.query(URL + quote(KSR.pv.get('$rU') or '', safe=''),
                                       'http_reply') < 0:
            KSR.tm.t_reply(500, 'Server Error')

    def http_reply(self, msg):
        """Resumed in an http_async_client worker with the answer."""
        if KSR.pv.get('$http_ok') != 1 or KSR.pv.get('$http_rs') != 200:
            KSR.tm.t_reply(503, 'Service Unavailable')
            return 1
        try:
            route = json.loads(KSR.pv.get('$http_rb') or '').get('Route')
        except (ValueError, AttributeError):
            KSR.tm.t_reply(503, 'Service Unavailable')
            return 1
        if route:
            KSR.pv.sets('$ru', str(route))
            KSR.tm.t_reply(302, 'Moved Temporarily')
        else:
            KSR.tm.t_reply(404, 'Not Found')
        return 1


def mod_init():
    return HttpRouter()
