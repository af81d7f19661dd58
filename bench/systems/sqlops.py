"""bench/compare.py's "sql": kg-sync's routing with the route read from PostgreSQL.

What an operator might use instead of an AMQP query for the same decision: sqlops'
``sql_pvquery`` on table ``kg_bench_routes`` (username -> route), synchronous in the SIP
worker. Same transaction handling and answers as examples/kamailio/router.py: a row ->
302 to its route, no row -> 404, a database error -> 503.
"""

import KSR

# sql.val.str quotes and escapes the R-URI user for SQL (sqlops' transformation).
QUERY = "SELECT route FROM kg_bench_routes WHERE username = $(rU{sql.val.str})"


class SqlRouter(object):

    def child_init(self, rank):
        return 0

    def ksr_request_route(self, msg):
        method = KSR.pv.get('$rm')
        if method == 'INVITE':
            if KSR.tm.t_newtran() < 0:
                KSR.sl.sl_send_reply(500, 'Server Error')
                return 1
            self.invite()
        elif method == 'ACK':
            KSR.tm.t_check_trans()
        else:
            KSR.sl.sl_send_reply(501, 'Not Implemented')
        return 1

    def invite(self):
        KSR.pv.sets('$var(route)', '')
        if KSR.sqlops.sql_pvquery('kg', QUERY, '$var(route)') < 0:
            KSR.tm.t_reply(503, 'Service Unavailable')
            return
        route = KSR.pv.get('$var(route)')
        if route:
            KSR.pv.sets('$ru', route)
            KSR.tm.t_reply(302, 'Moved Temporarily')
        else:
            KSR.tm.t_reply(404, 'Not Found')


def mod_init():
    return SqlRouter()
