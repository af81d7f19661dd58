"""A loopback TCP proxy to the broker that stops reading from its clients for STALL
seconds out of every PERIOD (a slow broker or network: the client's socket fills up).
SIGUSR1 freezes it completely (nothing forwarded either way, connections stay open: a
broker stopped with SIGSTOP, or a cut network); SIGUSR2 thaws it.

    python stall_proxy.py LISTEN_PORT STALL PERIOD     (prints "ready" when listening)

Plain threads, no gevent: it must stall independently of the process under test.
"""

import signal
import socket
import sys
import threading
import time

flowing = threading.Event()
flowing.set()


def pipe(src, dst, period, stall):
    try:
        while True:
            if stall:
                phase = time.monotonic() % period
                if phase < stall:
                    time.sleep(stall - phase)
            flowing.wait()
            data = src.recv(65536)
            if not data:
                break
            flowing.wait()
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main():
    port, stall, period = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    signal.signal(signal.SIGUSR1, lambda *_: flowing.clear())
    signal.signal(signal.SIGUSR2, lambda *_: flowing.set())
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(('127.0.0.1', port))
    server.listen(16)
    print('ready', flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(('127.0.0.1', 5672))
        threading.Thread(target=pipe, args=(client, upstream, period, stall),
                         daemon=True).start()
        threading.Thread(target=pipe, args=(upstream, client, period, 0.0),
                         daemon=True).start()


if __name__ == '__main__':
    main()
