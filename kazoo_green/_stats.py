"""Counters kept by the runtime and returned by ``Kazoo.stats()``."""

__all__ = ['Stats', 'COUNTERS', 'DOCS']

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
    ('connects', 'successful broker connections'),
    ('reconnects', 'connections made after a lost one'),
    ('connection_errors', 'connections lost or connect attempts failed'),
)
COUNTERS = tuple(name for name, _ in _COUNTERS)
DOCS = dict(_COUNTERS)


class Stats(object):
    """Plain integer counters; greenlets share one process so no locking.

    ``lost_reasons`` counts lost connections by the kind of error (``ConnectionResetError``,
    ``ConnectionLost``, ...), for the metrics."""

    __slots__ = COUNTERS + ('lost_reasons',)

    def __init__(self):
        for name in COUNTERS:
            setattr(self, name, 0)
        self.lost_reasons = {}

    def as_dict(self):
        return {name: getattr(self, name) for name in COUNTERS}
