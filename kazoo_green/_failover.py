"""One link's broker list and its failover policy: which broker to try, in which order,
with which TLS options and within what time.

The list is tried round-robin from the broker the connection was last on (kombu's
``failover_strategy='round-robin'`` moves its Connection along the same list), one broker
at a time, each attempt (TCP, TLS and AMQP handshakes) bounded by ``connect_timeout``. TLS
options are worked out per broker as it is tried (``_tls.for_broker``: the host name to
verify is that broker's).
"""

import logging

import gevent

from . import _tls
from .errors import NotConnected

__all__ = ['Brokers', 'safe_url']

log = logging.getLogger('kazoo_green')


class _AttemptTimeout(Exception):
    pass


class Brokers(object):
    """The URLs one link may connect to, and where it is in them."""

    def __init__(self, urls, ssl=None, connect_timeout=2.0):
        self.urls = list(urls)
        if not self.urls:
            raise ValueError('no broker URL given')
        self.memory = all(u.startswith('memory:') for u in self.urls)
        #: TLS options (``_tls.normalise``): None, or a dict used for every broker.
        self.ssl = _tls.normalise(ssl)
        self.connect_timeout = connect_timeout
        self.current = 0   # index in urls of the broker kombu's Connection is on

    def __len__(self):
        return len(self.urls)

    def kombu_url(self):
        """What kombu's Connection takes: the list, or the only URL."""
        return self.urls if len(self.urls) > 1 else self.urls[0]

    def reset(self):
        """A new kombu Connection starts at the first URL."""
        self.current = 0

    def describe(self):
        return ', '.join(safe_url(u) for u in self.urls)

    def attempt_all(self, conn, on_failure):
        """Connect ``conn`` to one of the brokers: each tried once, in turn from the
        current one. ``on_failure(exc, url)`` is told of each failed attempt; the last
        failure is raised. A NotConnected (the caller's own deadline) ends it at once."""
        for attempt in range(len(self.urls)):
            url = self.urls[self.current]
            conn.ssl = _tls.for_broker(self.ssl, url) if not self.memory else False
            try:
                with gevent.Timeout(self.connect_timeout, _AttemptTimeout(
                        'no answer within %.1fs' % self.connect_timeout)):
                    conn.ensure_connection(max_retries=0)
                return
            except NotConnected:
                raise
            except Exception as exc:
                on_failure(exc, url)
                if attempt == len(self.urls) - 1:
                    raise
                try:
                    conn.collect()
                except Exception:  # a half-made connection may fail in any way here
                    pass
                self.switch(conn)

    def switch(self, conn):
        """Move ``conn`` (and this list) on to the next broker."""
        if len(self.urls) > 1:
            conn.maybe_switch_next()
            self.current = (self.current + 1) % len(self.urls)


def safe_url(url):
    """A broker URL without its password."""
    if '@' not in url or '://' not in url:
        return url
    scheme, rest = url.split('://', 1)
    creds, host = rest.rsplit('@', 1)
    user = creds.split(':', 1)[0]
    return '%s://%s@%s' % (scheme, user, host)
