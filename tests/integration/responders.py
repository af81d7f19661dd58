"""Responders written with plain kombu/py-amqp, independent of kazoo_green.

``style='kazoo'`` answers the Kazoo way only: exchange ``targeted``, routing key
``Server-ID``, ``Msg-ID`` copied into the body; AMQP properties are ignored.
``style='generic'`` answers the generic AMQP way only: ``reply_to`` with the
request's ``correlation_id``; the body carries no ``Msg-ID``. ``style='bad'`` answers
as 'generic' with a body that is not JSON. A request with AMQP headers gets them back
in ``Headers``.
"""

import os
import socket
import subprocess
import sys

import kazoo_green  # noqa: F401  (gevent's patching before kombu, also when run alone)
import amqp
import gevent
import simplejson
from gevent.lock import RLock
from kombu import Connection

from ..conftest import RABBIT_URL, unique

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PlainResponder(object):
    def __init__(self, exchange, routing_key, style, delay=0.0, url=RABBIT_URL):
        self.style = style
        self.delay = delay
        self.requests = []
        self.answered = 0   # replies published
        self.conn = Connection(url)
        self.conn.connect()
        self.channel = self.conn.channel()
        # py-amqp declares auto_delete=True unless told; Kazoo's are not.
        self.channel.exchange_declare(exchange=exchange, type='topic', auto_delete=False)
        try:  # whoever made `targeted` first chose its flags; use it as it is
            self.channel.exchange_declare(exchange='targeted', type='direct', passive=True)
        except amqp.exceptions.NotFound:
            self.channel = self.conn.channel()
            self.channel.exchange_declare(exchange='targeted', type='direct',
                                          auto_delete=False)
        queue = unique('responder')
        self.channel.queue_declare(queue=queue, auto_delete=True)
        self.channel.queue_bind(queue=queue, exchange=exchange, routing_key=routing_key)
        self.channel.basic_consume(queue=queue, no_ack=True, callback=self._on_request)
        self._lock = RLock()
        self._running = True
        self._reader = gevent.spawn(self._read)

    def _read(self):
        while self._running:
            try:
                with self._lock:
                    self.conn.drain_events(timeout=0.05)
            except socket.timeout:
                pass
            gevent.sleep(0)

    def _on_request(self, message):
        request = simplejson.loads(message.body)
        self.requests.append((request, dict(message.properties)))
        if self.delay:
            gevent.spawn_later(self.delay, self._answer, request, message.properties)
        else:
            self._answer(request, message.properties)

    def _answer(self, request, props):
        if not self._running:
            return   # a delayed answer after close()
        body = {'Answer': request.get('To'), 'Style': self.style}
        if props.get('application_headers'):
            body['Headers'] = props['application_headers']
        if self.style == 'bad':
            msg = amqp.Message(b'{not json', content_type='application/json',
                               correlation_id=props['correlation_id'])
            exchange, key = '', props['reply_to']
        elif self.style == 'kazoo':
            body['Msg-ID'] = request['Msg-ID']
            msg = amqp.Message(simplejson.dumps(body), content_type='application/json')
            exchange, key = 'targeted', request['Server-ID']
        else:
            msg = amqp.Message(simplejson.dumps(body), content_type='application/json',
                               correlation_id=props['correlation_id'])
            exchange, key = '', props['reply_to']
        with self._lock:
            self.channel.basic_publish(msg, exchange=exchange, routing_key=key)
        self.answered += 1

    def close(self):
        self._running = False
        self._reader.join(1)
        try:
            self.conn.release()
        except Exception:
            pass


def spawn(exchange, style='kazoo', delay=0.0, url=None):
    """A PlainResponder in a process of its own (``main``), consuming once this returns:
    for callers that block their whole process while they wait. ``url``: its broker."""
    env = dict(os.environ)
    if url:
        env['KAZOO_GREEN_TEST_BROKER'] = url
    proc = subprocess.Popen([sys.executable, '-m', 'tests.integration.responders', exchange,
                             style, str(delay)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)
    if proc.stdout.readline().strip() != 'ready':
        proc.kill()
        raise RuntimeError('responder process did not start (exit %s)' % proc.wait())
    return proc


def main(argv):
    """``python -m tests.integration.responders EXCHANGE [STYLE [DELAY]]``: a responder in a
    process of its own (for callers that block their whole process while they wait)."""
    import sys
    exchange = argv[1]
    style = argv[2] if len(argv) > 2 else 'kazoo'
    delay = float(argv[3]) if len(argv) > 3 else 0.0
    responder = PlainResponder(exchange, 'route.req', style, delay)
    print('ready', flush=True)
    try:
        responder._reader.join()
    finally:
        responder.close()
    sys.exit(0)


if __name__ == '__main__':
    import sys
    main(sys.argv)
