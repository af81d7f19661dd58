"""bench/compare.py's "floor": answer every INVITE 302 to sip:<user>@127.0.0.1:5090, no AMQP.

The same transaction handling as examples/kamailio/router.py (t_newtran, t_reply; ACK ->
t_check_trans), so the difference to the kazoo_green systems is the query itself.
"""

import KSR


class Floor(object):

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
        """Answer the INVITE (its transaction exists)."""
        KSR.pv.sets('$ru', 'sip:%s@127.0.0.1:5090' % (KSR.pv.get('$rU') or ''))
        KSR.tm.t_reply(302, 'Moved Temporarily')


def mod_init():
    return Floor()
