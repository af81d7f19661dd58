"""Every configuration default of the runtime, in one place."""

__all__ = [
    'BROKERS', 'APP_NAME', 'QUERY_TIMEOUT', 'WORKERS', 'PUBLISH_BUFFER',
    'CONNECT_TIMEOUT', 'HEARTBEAT', 'POLL_INTERVAL', 'RECONNECT_DELAY',
    'RECONNECT_DELAY_MAX', 'SETUP_RETRY_MAX', 'STOP_TIMEOUT', 'TARGETED_EXCHANGE',
    'DIRECT_REPLY_TO', 'EVENT_KEY', 'EVENT_SUBKEY', 'ROUTE_PREFIX',
    'MEMORY_POLLING_INTERVAL', 'CONTENT_TYPE', 'CONFIRM_TIMEOUT', 'PROBE_GRACE',
    'REPLY_QUEUE_WAIT', 'ZONE', 'ANSWERED_MEMORY', 'VIA_RETRY_MAX',
]

#: Used when no broker list is given.
BROKERS = 'amqp://guest:guest@127.0.0.1:5672//'
#: ``App-Name`` stamped on outgoing messages.
APP_NAME = 'kazoo_green'
#: Seconds a query waits for its reply (the C module's default).
QUERY_TIMEOUT = 2.0
#: Greenlets that run event-route handlers.
WORKERS = 8
#: Publishes kept while no broker is reachable; one more raises BufferFull.
PUBLISH_BUFFER = 10000
#: Seconds allowed for one broker's TCP + AMQP handshake.
CONNECT_TIMEOUT = 2.0
#: AMQP heartbeat (seconds) for connections that have a background reader.
#: Connections used only from SIP workers run without heartbeats: nothing
#: runs there between SIP messages to answer them.
HEARTBEAT = 10
#: How long the background reader blocks in one read before it checks
#: heartbeats and lets a waiting synchronous AMQP call take the socket.
POLL_INTERVAL = 0.1
#: First and largest pause between two full rounds of failed connects.
RECONNECT_DELAY = 0.1
RECONNECT_DELAY_MAX = 2.0
#: Largest pause between two tries to set up a subscription the broker refused (while
#: it is refused, its messages are unroutable: a try a second costs less than that).
SETUP_RETRY_MAX = 1.0
#: Seconds a caller-driven connection has to answer a probe sent after a query
#: timed out, before it counts as dead (a frozen broker never closes TCP).
PROBE_GRACE = 0.5
#: Seconds a connect waits for the broker to confirm this process's reply queue when
#: direct reply-to can carry replies meanwhile (a cluster with a frozen node stalls
#: queue declarations until net_ticktime, 60 s by default, declares the node down).
REPLY_QUEUE_WAIT = 0.2
#: Seconds stop() waits for in-flight handlers to finish.
STOP_TIMEOUT = 10.0
#: Direct exchange where Kazoo-style responders send replies (Server-ID).
TARGETED_EXCHANGE = 'targeted'
#: RabbitMQ's direct reply-to pseudo queue.
DIRECT_REPLY_TO = 'amq.rabbitmq.reply-to'
#: Payload fields that choose the event route.
EVENT_KEY = 'Event-Category'
EVENT_SUBKEY = 'Event-Name'
ROUTE_PREFIX = 'kazoo:consumer-event'
#: kombu's memory:// transport polls; its default (1 s) is too slow.
MEMORY_POLLING_INTERVAL = 0.005
CONTENT_TYPE = 'application/json'
#: Seconds a confirmed publish may take, re-sends after a lost connection included.
CONFIRM_TIMEOUT = 5.0
#: The zone of brokers given without one (the C module's default zone name).
ZONE = 'local'
#: Msg-IDs of answered and timed-out queries remembered per reply waiter, so that a
#: second copy of a reply (standalone brokers) or a late one is not taken for an
#: unsolicited message.
ANSWERED_MEMORY = 4096
#: Largest pause before a caller-driven query tries again to reach a standalone broker
#: (of its zone) that refused its reply-only connection.
VIA_RETRY_MAX = 5.0
