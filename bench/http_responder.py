"""The HTTP twin of examples/responder.py, for bench/compare.py's "http-async" system.

``GET /route/<user>`` answers 200 with the JSON body examples/responder.py replies with:
``{"Event-Category": "route", "Event-Name": "resp", "Route": "sip:<user>@127.0.0.1:5090"}``,
no ``Route`` for users starting with ``unknown``, the answer after 5 s for users starting
with ``slow``. HTTP/1.1 with keep-alive (gevent's WSGI server), TCP_NODELAY. Stops on SIGTERM/SIGINT.

    .venv/bin/python bench/http_responder.py [--port 8091]
"""

import argparse
import json
import signal
import socket
from urllib.parse import unquote

import gevent
from gevent.pywsgi import WSGIServer

SLOW_SECONDS = 5.0


def app(environ, start_response):
    path = environ.get('PATH_INFO', '')
    if environ['REQUEST_METHOD'] != 'GET' or not path.startswith('/route/'):
        start_response('404 Not Found', [('Content-Type', 'text/plain')])
        return [b'GET /route/<user>\n']
    user = unquote(path[len('/route/'):])
    reply = {'Event-Category': 'route', 'Event-Name': 'resp'}
    if user.startswith('slow'):
        gevent.sleep(SLOW_SECONDS)
    if not user.startswith('unknown'):
        reply['Route'] = 'sip:%s@127.0.0.1:5090' % user
    body = json.dumps(reply).encode()
    start_response('200 OK', [('Content-Type', 'application/json'),
                              ('Content-Length', str(len(body)))])
    return [body]


class Server(WSGIServer):
    """TCP_NODELAY on each connection: without it a keep-alive answer written in two
    sends waits for the client's delayed ACK (p50 44 ms seen)."""

    def handle(self, sock, address):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return super(Server, self).handle(sock, address)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--port', type=int, default=8091)
    args = p.parse_args()
    server = Server(('127.0.0.1', args.port), app, log=None)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    gevent.signal_handler(signal.SIGINT, server.stop)
    server.serve_forever()


if __name__ == '__main__':
    main()
