"""A loopback TCP proxy to the broker that stops reading from its clients for STALL
seconds out of every PERIOD (a slow broker or network: the client's socket fills up).

    python stall_proxy.py LISTEN_PORT STALL PERIOD     (prints "ready" when listening)

Plain threads, no gevent: it must stall independently of the process under test.
"""

import socket
import sys
import threading
import time


def pipe(src, dst, period, stall):
    try:
        while True:
            if stall:
                phase = time.monotonic() % period
                if phase < stall:
                    time.sleep(stall - phase)
            data = src.recv(65536)
            if not data:
                break
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
