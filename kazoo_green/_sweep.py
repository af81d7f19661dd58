"""Queues with fixed names against RabbitMQ 3.x's clean-up after a cluster node died.

When a node dies, every surviving node of a RabbitMQ 3.x (Mnesia) cluster deletes the
transient queues that lived on it: each lists them, then deletes them *by name* with
their bindings, in separate transactions (``rabbit_amqqueue:on_node_down``). A client
that reconnected to a surviving node and declared such a queue again under the same name
in between loses the new queue's record and bindings to that clean-up. The queue's
process lives on with its consumer, which the broker never cancels, but nothing is
routed to it any more (rabbitmq-server#6271, #6274): a responder's named queue answers
nothing, and publishers get NO_ROUTE, for as long as the connection lasts.

Queues whose names are made up per connection are not exposed (the clean-up deletes
only the old names). For those with fixed names, ``SweepGuard`` looks again at every
connect of a link to a cluster (more than one broker URL): at ``CHECKS`` seconds after
it, a passive ``queue.declare`` on a channel of its own says whether the queue is still
there. One that is gone is declared, bound and consumed again (the caller's ``redo``),
counted in ``queues_swept``, and the checks start over for it. The consumer on the old,
unreachable queue is left to drain what that queue still holds: nothing is lost.
"""

import logging
from time import monotonic

import gevent

from .errors import KazooError

__all__ = ['SweepGuard', 'CHECKS']

log = logging.getLogger('kazoo_green')

#: When a link's watched queues are looked at, in seconds after its connect (or after a
#: queue was declared again). The clean-up runs as soon as the survivors see the node
#: down; under load it has been seen to take a second or more.
CHECKS = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def queue_missing(conn, name, channel_errors):
    """Whether queue ``name`` does not exist (a passive declare on a new channel of
    ``conn`` answered 404 "no queue"). Another refusal (its durable queue's node down,
    another connection's exclusive queue) raises as a channel error."""
    channel = conn.channel()
    try:
        channel.queue_declare(queue=name, passive=True)
    except channel_errors as exc:
        if getattr(exc, 'reply_code', None) == 404 and 'no queue' in str(exc):
            return True
        raise
    finally:
        try:
            channel.close()   # py-amqp re-opened it if the broker closed it
        except Exception:
            pass
    return False


class SweepGuard(object):
    """Watches the fixed-name queues declared on ``link``'s connections (see module
    docstring). ``watch(key, name, redo)``: ``redo(conn)`` declares, binds and consumes
    queue ``name`` again on the link's connection ``conn`` (called through ``link.rpc``);
    ``key`` says whose it is (``forget(key)``)."""

    def __init__(self, link):
        self.link = link
        self._watched = {}    # key -> (queue name, redo)
        self._greenlet = None
        self._generation = None   # the connection the checks are for
        self._start = 0.0         # CHECKS count from here
        self._step = len(CHECKS)  # the next check's index (none due: len(CHECKS))
        self.enabled = len(link.brokers) > 1 and not link.brokers.memory
        link.on_up(self._connected)
        link.on_down(self._lost)

    def watch(self, key, name, redo):
        self._watched[key] = (name, redo)

    def forget(self, key):
        self._watched.pop(key, None)

    @property
    def due(self):
        """When the next check is due (monotonic seconds), or None."""
        if self._step >= len(CHECKS):
            return None
        return self._start + CHECKS[self._step]

    def tick(self):
        """Look at the watched queues if a check is due. For a link without a reader
        (a resume loop's): whoever drives it calls this. Never raises."""
        due = self.due
        if due is not None and monotonic() >= due:
            try:
                self._check()
            except Exception:
                log.exception('%s link: checking queues failed', self.link.name)

    def _connected(self, link):
        self._stop()
        if not (self.enabled and self._watched):
            return
        self._generation = link.generation
        self._start, self._step = monotonic(), 0
        if link._reader is not None:
            self._greenlet = gevent.spawn(self._run)

    def _lost(self, link, exc):
        self._stop()

    def _stop(self):
        self._step = len(CHECKS)
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None and greenlet is not gevent.getcurrent():
            greenlet.kill(block=False)

    def _run(self):
        while True:
            due = self.due
            if due is None:
                return
            gevent.sleep(max(0.0, due - monotonic()))
            self._check()

    def _check(self):
        self._step += 1
        link = self.link
        for name, redo in list(self._watched.values()):
            if link.generation != self._generation or not link.connected:
                self._stop()   # the next connect looks again
                return
            try:
                if not link.rpc(queue_missing, link._conn, name, link.channel_errors):
                    continue
            except link.channel_errors as exc:
                log.debug('cannot look at queue %s: %s', name, exc)
                continue
            except KazooError:
                self._stop()
                return
            link.stats.queues_swept += 1
            log.warning('queue %s was deleted by the broker after it was declared (a '
                        'RabbitMQ 3.x cluster cleaning up after a node that died: '
                        'rabbitmq-server#6271); declaring it again', name)
            try:
                link.rpc(redo, link._conn)
            except link.channel_errors as exc:
                link.stats.setup_errors += 1
                log.error('cannot declare queue %s again: %s; next look in %.1fs',
                          name, exc, CHECKS[0])
            except KazooError:
                self._stop()
                return
            self._start, self._step = monotonic(), 0
