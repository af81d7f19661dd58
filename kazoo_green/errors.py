"""Exceptions raised by kazoo_green's public calls."""

__all__ = [
    'KazooError', 'InvalidPayload', 'BadMessage', 'NotConnected',
    'ConnectionLost', 'QueryTimeout', 'QueryFailed', 'Unroutable',
    'UnknownExchange', 'PublishNacked', 'BufferFull',
]


class KazooError(Exception):
    """Base class of every kazoo_green error."""


class InvalidPayload(KazooError, ValueError):
    """A payload given to publish/query is not a JSON object; nothing was sent."""


class BadMessage(KazooError):
    """A consumed message could not be turned into a payload (see ``reason``)."""

    def __init__(self, reason, detail=''):
        super().__init__('%s%s' % (reason, ': ' + detail if detail else ''))
        self.reason = reason


class NotConnected(KazooError):
    """No broker could be reached in time."""


class ConnectionLost(NotConnected):
    """The broker connection died while the call was waiting."""


class QueryFailed(KazooError):
    """A query ended without a reply for a reason other than its timeout."""


class QueryTimeout(QueryFailed):
    """No reply arrived before the query's deadline."""


class Unroutable(QueryFailed):
    """The broker returned the message: no queue is bound for its routing key."""


class UnknownExchange(KazooError):
    """The exchange does not exist on the broker; nothing was sent."""


class PublishNacked(KazooError):
    """The broker refused a confirmed publish (basic.nack)."""


class BufferFull(KazooError):
    """No broker is reachable and the publish buffer is full; nothing was kept."""


class Overloaded(KazooError):
    """An async query refused before anything was done: this Kamailio instance's
    replies are being resumed late (see ``kemi.Kazoo(shed_lag=)``). Answer at once,
    e.g. ``KSR.sl.sl_send_reply(503, 'Service Unavailable')``."""
