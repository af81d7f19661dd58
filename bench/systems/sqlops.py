"""bench/compare.py's "sql": kg-sync's routing with the route read from PostgreSQL.

What an operator might use instead of an AMQP query for the same decision: sqlops'
``sql_pvquery`` on table ``kg_bench_routes`` (username -> route), synchronous in the SIP
worker. Same transaction handling and answers as examples/kamailio/router.py: a row ->
302 to its route, no row -> 404, a database error -> 503.
"""

import KSR
from floor import Floor

# sql.val.str quotes and escapes the R-URI user for SQL (sqlops' transformation).
QUERY = "SELECT route FROM kg_bench_routes WHERE username = $(rU{sql.val.str})"


class SqlRouter(Floor):
    """floor.py's transaction handling; the INVITE answered from the table."""

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
