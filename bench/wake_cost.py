"""CPU one wake-up of a waiting process costs: poll(2) against gevent's hub.

A child process writes 300 bytes to a socket pair every 0.5 ms (busy-waiting, so the
interval is exact); the parent waits for each write, reads it, and counts its own CPU
(``time.process_time``) per wake-up, once waiting in the real ``poll(2)`` and once in
gevent's ``wait_read`` (a reader greenlet's wait). Alternated ``--rounds`` times. This
is what ``kazoo_green._resumeloop`` saves a ``kazoo_resumer`` process per wake-up.

    .venv/bin/python bench/wake_cost.py [--wakes 20000] [--rounds 2]
"""

import argparse
import os
import socket
import time

import gevent
from gevent import monkey
from gevent.socket import wait_read

_poll = monkey.get_original('select', 'poll')
import select  # noqa: E402


def _writer(sock, wakes):
    for _ in range(wakes):
        sock.send(b'x' * 300)
        until = time.monotonic() + 0.0005
        while time.monotonic() < until:
            pass
    sock.close()


def run(mode, wakes):
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        a.close()
        _writer(b, wakes)
        os._exit(0)
    b.close()
    fd = a.fileno()
    a.setblocking(False)
    n = 0
    started = time.process_time()
    if mode == 'poll':
        poller = _poll()
        poller.register(fd, select.POLLIN)
        while True:
            poller.poll(1000)
            if not os.read(fd, 65536):
                break
            n += 1
    else:
        while True:
            wait_read(fd, 1.0)
            if not os.read(fd, 65536):
                break
            n += 1
    spent = time.process_time() - started
    os.waitpid(pid, 0)
    a.close()
    return n, spent / max(n, 1) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--wakes', type=int, default=20000)
    p.add_argument('--rounds', type=int, default=2)
    args = p.parse_args()
    gevent.get_hub()
    for _ in range(args.rounds):
        for mode in ('poll', 'gevent'):
            n, us = run(mode, args.wakes)
            print('%-7s %6d wake-ups  %5.1f us CPU per wake-up' % (mode, n, us))


if __name__ == '__main__':
    main()
