"""bench/compare.py's "py-bound-async": the least Python an async query can run, as
py-bound is for the sync one.

kg-async's routing with a hand-written suspend/resume over AMQP: a SIP worker suspends
the transaction (``t_suspend``) and writes the request's frames (``encode_publish``,
one ``send``; ``correlation_id`` and ``Msg-ID`` carry the transaction's index and
label, ``reply_to`` the resume queue); two rtimer processes consume the resume queue
(``no_ack``), each in a bare ``poll`` + ``recv`` loop that cuts the body frames out of
the stream, reads them with orjson and resumes the transaction (``t_continue``) into a
route that answers 302. kazoo_green only opens the connections. No deadline (tm's
timers only), no acks, no correlation checks, no error handling, no counters, no
heartbeats: a lower bound for what kg-async costs, not something to deploy.
"""

import os
from struct import Struct
from time import monotonic

import venv_path  # noqa: F401  (the venv on sys.path: first)

import orjson  # noqa: E402

import kazoo_green  # noqa: E402,F401
from kazoo_green import Kazoo  # noqa: E402
from kazoo_green._amqpfast import _poll, encode_publish  # noqa: E402
from kazoo_green.wire import new_msg_id  # noqa: E402

import KSR  # noqa: E402

from floor import Floor  # noqa: E402

#: The resume queue (the responder answers to ``reply_to`` on the default exchange).
QUEUE = 'kg-bound-async-resume'
_FRAME = Struct('>BHI')
_state = {}     # pid -> (send, channel id, frame_max, the Kazoo kept alive) of a SIP worker
_reply = [None]  # the reply being resumed


def _kazoo():
    return Kazoo(app_name='kamailio', node='kamailio@kg-bound-async', blocking=True,
                 heartbeat=0)


class BoundAsync(Floor):

    def child_init(self, rank):
        import gevent
        gevent.reinit()
        return 0

    def invite(self):
        state = _state.get(os.getpid())
        if state is None:
            kz = _kazoo()
            kz._pub_link.ensure(monotonic() + 10)
            fast = kz._pub_link.fast
            state = _state[os.getpid()] = (fast._send, kz._publisher.channel.channel_id,
                                           fast.frame_max, kz)
        send, channel, frame_max, _ = state
        pv = KSR.pv
        msg_id = '%s:%s:%s' % (pv.get('$T(id_index)'), pv.get('$T(id_label)'), new_msg_id())
        if KSR.tmx.t_suspend() < 0:
            KSR.tm.t_reply(500, 'Server Error')
            return
        send(encode_publish(channel, 'callmgr', 'route.req', orjson.dumps({
            'Event-Category': 'route', 'Event-Name': 'req', 'To': pv.get('$rU') or '',
            'From': pv.get('$fU'), 'Call-ID': pv.get('$ci'), 'App-Name': 'kamailio',
            'App-Version': '1', 'Node': 'kamailio@kg-bound-async', 'Msg-ID': msg_id}),
            {'content_type': 'application/json', 'correlation_id': msg_id,
             'reply_to': QUEUE}, None, False, frame_max))

    def bound_resumer(self, msg, evname=None):
        """rtimer (mode=2): consume the resume queue and resume; never returns."""
        kz = _kazoo()
        link = kz._pub_link
        link.ensure(monotonic() + 10)
        channel = link._raw.channel()
        channel.queue_declare(queue=QUEUE, durable=False, exclusive=False, auto_delete=False)
        channel.basic_consume(queue=QUEUE, no_ack=True)
        fast = link.fast
        buf = bytearray(fast._buf[fast._pos:])   # what py-amqp's reads buffered already
        recv = fast._recv
        poller = _poll()   # the real poll(2), not gevent's
        poller.register(fast._fileno, 1)
        poll = poller.poll
        t_continue = KSR.tmx.t_continue
        while True:
            while len(buf) >= 8:
                kind, _, size = _FRAME.unpack_from(buf)
                if len(buf) < size + 8:
                    break
                if kind == 3:   # a body frame: the whole reply (small)
                    reply = orjson.loads(bytes(buf[7:7 + size]))
                    index, label, _ = reply['Msg-ID'].split(':', 2)
                    _reply[0] = reply
                    t_continue(int(index), int(label), 'bound_resume')
                del buf[:size + 8]
            poll(1000)
            buf += recv(65536)

    def bound_resume(self, msg, evname=None):
        KSR.pv.sets('$ru', str(_reply[0].get('Route')))
        KSR.tm.t_reply(302, 'Moved Temporarily')
        return 1


def mod_init():
    return BoundAsync()
