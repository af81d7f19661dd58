"""Counters and latency histograms kept by the runtime (``Kazoo.stats()``,
``Kazoo.histograms()``), read by the exporters (``kazoo_green.metrics`` outside Kamailio,
``kazoo_green._kamstats`` inside it)."""

from bisect import bisect_left
from math import fsum

__all__ = ['Stats', 'Histogram', 'COUNTERS', 'DOCS', 'BUCKETS', 'HISTOGRAMS', 'LOST_KINDS',
           'lost_kind']

#: (name, what it counts), in the order ``stats()`` lists them.
_COUNTERS = (
    ('published', 'messages written to a broker'),
    ('confirmed', 'publisher confirms received (basic.ack)'),
    ('nacked', 'publisher confirms refused (basic.nack)'),
    ('returned', 'mandatory messages returned unroutable'),
    ('buffered', 'publishes kept while disconnected (total)'),
    ('buffer_flushed', 'buffered publishes sent after a reconnect'),
    ('publish_errors', 'publishes that raised (unknown exchange, full buffer, ...)'),
    ('queries', 'queries sent'),
    ('queries_ok', 'queries answered'),
    ('queries_timeout', 'queries that reached their deadline'),
    ('queries_failed', 'queries failed otherwise (connection lost, unroutable)'),
    ('async_late', 'async replies that came after their deadline: not resumed (tm answered '
                   'the transaction through on_timeout)'),
    ('async_shed', 'async queries refused at once (Overloaded) while replies were resumed '
                   'late: see Kazoo(shed_lag=)'),
    ('replies_unmatched', 'replies that matched no waiting query (late, copies, or foreign '
                          'where no event-route workers run)'),
    ('unsolicited', 'messages on a reply queue answering no query, run as events'),
    ('reply_queue_late', 'reply queues the broker had not confirmed when queries began'),
    ('consumed', 'messages delivered to subscriptions'),
    ('acked', 'consumed messages acked'),
    ('rejected', 'consumed messages rejected (dead-lettered where the queue has a DLX)'),
    ('bad_input', 'consumed messages or replies that could not be decoded (not a JSON '
                  'object, ...)'),
    ('unrouted', 'good messages with no event route defined for them'),
    ('handler_errors', 'event-route handlers that raised'),
    ('ack_failed', 'acks/rejects that could not be sent (connection gone)'),
    ('setup_errors', 'subscription setups the broker refused (each retried)'),
    ('queues_swept', 'fixed-name queues a cluster deleted after they were declared (its '
                     'clean-up after a node died): each declared again'),
    ('connects', 'successful broker connections'),
    ('reconnects', 'connections made after a lost one'),
    ('connection_errors', 'connections lost or connect attempts failed'),
)
COUNTERS = tuple(name for name, _ in _COUNTERS)
DOCS = dict(_COUNTERS)


#: Upper bounds (seconds) of the latency histograms' buckets (+Inf implied): Prometheus'
#: defaults with the sub-millisecond ones a query on loopback takes.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0)

#: name -> (label, what it measures).
HISTOGRAMS = {
    'query_seconds': ('exchange', 'time from a query sent to its reply, answered queries '
                                  'only (timeouts: queries_timeout)'),
    'handler_seconds': ('route', 'time an event-route handler ran (those that raised too)'),
}

#: The kinds a lost connection is counted under where names must be declared in
#: advance (Kamailio's counters): ``lost_<kind>``.
LOST_KINDS = ('reset', 'closed', 'timeout', 'other')
_LOST_KIND = {
    'ConnectionResetError': 'reset', 'BrokenPipeError': 'reset',
    'ConnectionAbortedError': 'reset', 'closed': 'closed', 'ConnectionLost': 'closed',
    'RecoverableConnectionError': 'closed', 'IOError': 'closed', 'OSError': 'closed',
    'ConnectionForced': 'closed', 'ConnectionError': 'closed',
    'timeout': 'timeout', 'TimeoutError': 'timeout',
    'BrokerUnresponsive': 'timeout',
}


def lost_kind(reason):
    """The LOST_KINDS entry for a lost connection's reason (its exception's class name)."""
    return _LOST_KIND.get(reason, 'other')


class Histogram(object):
    """Counts of observations per bucket of BUCKETS (not cumulative; the last one is
    +Inf), their sum and count.

    >>> h = Histogram()
    >>> [h.observe(seconds) for seconds in (0.0004, 0.003, 0.003, 12.0)]   # bucket indexes
    [0, 3, 3, 14]
    >>> h.count, h.cumulative()[0], h.cumulative()[3], h.cumulative()[-1]
    (4, (0.0005, 1), (0.005, 3), (inf, 4))
    """

    __slots__ = ('counts', 'sums')

    def __init__(self, counts=None, sums=None):
        # Lists, or views of shared memory (Kamailio: kazoo_green._kamstats), per bucket.
        self.counts = [0] * (len(BUCKETS) + 1) if counts is None else counts
        self.sums = [0.0] * (len(BUCKETS) + 1) if sums is None else sums

    def observe(self, seconds):
        """Count ``seconds``; returns the index of its bucket. (On every query: the
        totals are summed when read instead.) The sum before the count: a reader in
        another process that sees the count sees the sum."""
        i = bisect_left(BUCKETS, seconds)
        self.sums[i] += seconds
        self.counts[i] += 1
        return i

    @property
    def count(self):
        return sum(self.counts)

    @property
    def sum(self):
        return fsum(self.sums)

    def cumulative(self):
        """[(upper bound, observations <= it)], +Inf (float('inf')) last."""
        out, total = [], 0
        for bound, n in zip(BUCKETS + (float('inf'),), self.counts):
            total += n
            out.append((bound, total))
        return out


class Stats(object):
    """Plain integer counters; greenlets share one process so no locking.

    ``lost_reasons`` counts lost connections by the kind of error (``ConnectionResetError``,
    ``ConnectionLost``, ...), for the metrics. ``query_seconds`` (by exchange) and
    ``handler_seconds`` (by event route) hold Histograms; ``new_histogram``, when set
    (Kamailio's statistics), makes them: ``new_histogram(histogram name, label value)``."""

    __slots__ = COUNTERS + ('lost_reasons', 'query_seconds', 'handler_seconds',
                            'new_histogram', 'clean_ask')

    def __init__(self):
        for name in COUNTERS:
            setattr(self, name, 0)
        self.lost_reasons = {}
        self.query_seconds = {}
        self.handler_seconds = {}
        self.new_histogram = None
        #: Set by a blocking query whose lane read its reply and nothing else: only
        #: ``queries``, ``published`` and ``queries_ok`` changed (kemi stores just those).
        self.clean_ask = False

    def as_dict(self):
        return {name: getattr(self, name) for name in COUNTERS}

    def observe(self, name, key, seconds):
        """One observation for histogram ``name`` (of HISTOGRAMS) labelled ``key``."""
        h = getattr(self, name).get(key)
        if h is None:
            make = self.new_histogram
            h = getattr(self, name)[key] = Histogram() if make is None else make(name, key)
        h.observe(seconds)
