"""Log lines about bad input, bounded: whoever can publish must not be able to flood
Kamailio's log (every bad message is still counted)."""

import logging
from time import monotonic

__all__ = ['bad_input', 'short']

log = logging.getLogger('kazoo_green')


def short(value, limit=80):
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + '...'


class _Limiter(object):
    """At most ``rate`` lines a second; how many were left out is said with the next."""

    def __init__(self, rate):
        self.rate = rate
        self._since = 0.0
        self._lines = 0
        self._dropped = 0

    def warning(self, message, *args):
        now = monotonic()
        if now - self._since >= 1.0:
            if self._dropped:
                log.warning('(%d more lines about bad input left out)', self._dropped)
            self._since, self._lines, self._dropped = now, 0, 0
        if self._lines < self.rate:
            self._lines += 1
            log.warning(message, *args)
        else:
            self._dropped += 1


#: One line per bad message (consumed or a reply), up to 20 a second.
bad_input = _Limiter(20)
