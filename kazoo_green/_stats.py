"""Counters kept by the runtime and returned by ``Kazoo.stats()``."""

__all__ = ['Stats', 'COUNTERS']

COUNTERS = (
    'published',          # messages written to a broker
    'confirmed',          # publisher confirms received (basic.ack)
    'nacked',             # publisher confirms refused (basic.nack)
    'returned',           # mandatory messages returned unroutable
    'buffered',           # publishes kept while disconnected (total)
    'buffer_flushed',     # buffered publishes sent after a reconnect
    'publish_errors',     # publishes that raised (unknown exchange, full buffer, ...)
    'queries',            # queries sent
    'queries_ok',         # queries answered
    'queries_timeout',    # queries that reached their deadline
    'queries_failed',     # queries failed otherwise (connection lost, unroutable)
    'replies_unmatched',  # replies that matched no waiting query (late, copies, or foreign
                          # where no event-route workers run)
    'unsolicited',        # messages on a reply queue answering no query, run as events
    'reply_queue_late',   # reply queues the broker had not confirmed when queries began
    'consumed',           # messages delivered to subscriptions
    'acked',
    'rejected',
    'bad_input',          # consumed messages that were not a JSON object with key fields
    'unrouted',           # good messages with no event route defined for them
    'handler_errors',     # event-route handlers that raised
    'ack_failed',         # acks/rejects that could not be sent (connection gone)
    'setup_errors',       # subscription setups the broker refused (each retried)
    'connects',           # successful broker connections
    'reconnects',         # connections made after a lost one
    'connection_errors',  # connections lost or connect attempts failed
)


class Stats(object):
    """Plain integer counters; greenlets share one process so no locking."""

    __slots__ = COUNTERS

    def __init__(self):
        for name in COUNTERS:
            setattr(self, name, 0)

    def as_dict(self):
        return {name: getattr(self, name) for name in COUNTERS}
