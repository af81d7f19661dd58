"""Publishing: exchange checks, publisher confirms, and the buffer used while disconnected."""

import logging
from collections import deque
from time import monotonic

import gevent
from gevent.event import AsyncResult

from . import _defaults as D
from ._amqpfast import FAST_PROPERTIES, encode_publish
from .errors import (
    BufferFull, ConnectionLost, NotConnected, PublishNacked, UnknownExchange,
)

__all__ = ['Publisher']

log = logging.getLogger('kazoo_green')


class Publisher(object):
    """Sends messages on one link: a plain channel, a confirm channel and a probe channel.

    The plain channel also carries queries, so the direct reply-to consumer
    (see ``_query``) lives on it. An exchange is checked with a passive
    declare (on the probe channel) the first time it is used on a
    connection: publishing to a missing exchange would make the broker close
    the publishing channel and every reply consumer with it.
    """

    def __init__(self, link, stats, buffer_size=D.PUBLISH_BUFFER):
        self.link = link
        self.stats = stats
        self.buffer_size = buffer_size
        self.channel = None
        #: ``fn(correlation_id, exchange, routing_key, reply_text)`` for a returned
        #: message: True if it took it (a waiting query), else it is logged here.
        self.on_return = None
        self._probe = None
        self._confirm = None
        self._confirms = {}
        self._seq = 0
        self.verified = set()
        self._buffer = deque()
        link.add_up_hook(self._setup)
        link.on_up(self._flush)
        link.on_down(self._down)

    @property
    def buffered(self):
        return len(self._buffer)

    # -- connection life ------------------------------------------------
    def _setup(self, conn):
        self.verified = set()
        self.channel = conn.channel()
        self._probe = conn.channel()
        self._confirm = None
        self._seq = 0
        if self.link.supports_amqp:
            self.channel.events['basic_return'].add(self._returned)
            self._confirm = self._open_confirm_channel(conn)

    def _open_confirm_channel(self, conn):
        confirm = conn.channel()
        confirm.confirm_select()
        confirm.events['basic_ack'].add(self._acked)
        confirm.events['basic_nack'].add(self._nacked)
        confirm.events['basic_return'].add(self._returned)
        return confirm

    def _renew_confirm_channel(self):
        """A fresh confirm channel: RabbitMQ can keep nacking on a channel whose first
        publish to a quorum queue came while the queue had no leader."""
        old = self._confirm
        new = self.link.rpc(self._open_confirm_channel, self.link._conn)
        with self.link._wlock:
            for result in self._confirms.values():
                result.set_exception(ConnectionLost('confirm channel renewed'))
            self._confirms = {}
            self._seq = 0
            self._confirm = new
        try:
            self.link.rpc(old.close)
        except Exception:  # best effort: it is abandoned either way
            pass

    def _down(self, link, exc):
        pending, self._confirms = self._confirms, {}
        error = ConnectionLost('%s link lost before the broker confirmed: %s' % (link.name, exc))
        for result in pending.values():
            result.set_exception(error)

    def _flush(self, link):
        """Send what was buffered while disconnected, oldest first."""
        if not self._buffer:
            return
        sent = 0
        try:
            with link._wlock:
                while self._buffer and link.connected:
                    exchange, routing_key, body, headers, props, mandatory = self._buffer[0]
                    try:
                        self._send(exchange, routing_key, body, headers, props, mandatory)
                    except UnknownExchange as exc:
                        self.stats.publish_errors += 1
                        log.error('dropping buffered message to %r/%r: %s',
                                  exchange, routing_key, exc)
                    self._buffer.popleft()
                    sent += 1
        except NotConnected:
            pass
        self.stats.buffer_flushed += sent
        if sent:
            log.info('%s link: sent %d buffered messages, %d left', link.name,
                     sent, len(self._buffer))

    # -- broker callbacks (run in whichever greenlet reads) ------------
    def _acked(self, tag, multiple):
        self._settle(tag, multiple, True)

    def _nacked(self, tag, multiple):
        self._settle(tag, multiple, False)

    def _settle(self, tag, multiple, ok):
        confirms = self._confirms
        if multiple:
            tags = [t for t in confirms if t <= tag]
        else:
            tags = [tag] if tag in confirms else []
        for t in tags:
            result = confirms.pop(t)
            if ok:
                self.stats.confirmed += 1
                result.set(True)
            else:
                self.stats.nacked += 1
                result.set_exception(PublishNacked('broker refused message %d' % t))

    def _returned(self, exc, exchange, routing_key, message):
        self.stats.returned += 1
        correlation_id = message.properties.get('correlation_id')
        reason = getattr(exc, 'reply_text', str(exc))
        # A waiting query takes the error (its caller decides what to log).
        if not (self.on_return is not None and correlation_id
                and self.on_return(correlation_id, exchange, routing_key, reason)):
            log.warning('message to %r/%r returned by the broker: %s', exchange,
                        routing_key, reason)

    # -- sending --------------------------------------------------------
    def send_probe(self):
        """Write (without waiting) a request the broker answers, on the probe channel."""
        self.link.fast.probe(self._probe.channel_id)

    def verify(self, exchange):
        """Raise UnknownExchange unless ``exchange`` exists (cached per connection)."""
        if not exchange or exchange in self.verified or exchange.startswith('amq.'):
            return
        probe = self._probe
        try:
            self.link.rpc(probe.exchange_declare, exchange=exchange, type='direct',
                          passive=True)
        except self.link.channel_errors as exc:
            raise UnknownExchange('exchange %r does not exist: %s' % (exchange, exc)) from None
        self.verified.add(exchange)

    def frames(self, exchange, routing_key, body, headers, props, mandatory, channel=None):
        """The bytes of one publish on ``channel`` (default: the plain one), or None where
        the lean path does not apply (not RabbitMQ, or a property it does not encode).
        Checks the exchange; the link must be up."""
        fast = self.link.fast
        if fast is None or (props and not FAST_PROPERTIES.issuperset(props)):
            return None
        self.verify(exchange)
        properties = dict(props) if props else {}
        properties['content_type'] = D.CONTENT_TYPE
        properties['content_encoding'] = 'utf-8'
        return encode_publish((channel or self.channel).channel_id, exchange, routing_key,
                              body, properties, headers, mandatory, fast.frame_max)

    def _send(self, exchange, routing_key, body, headers, props, mandatory, channel=None):
        """Write one message; the link must be up."""
        channel = channel or self.channel
        link = self.link
        data = self.frames(exchange, routing_key, body, headers, props, mandatory, channel)
        if data is not None:
            link.write(link.fast.send, data)
        else:
            self.verify(exchange)
            message = channel.prepare_message(body, None, D.CONTENT_TYPE, 'utf-8', headers,
                                              dict(props) if props else None)
            link.write(channel.basic_publish, message, exchange=exchange,
                       routing_key=routing_key, mandatory=mandatory)
        self.stats.published += 1

    def send_together(self, messages):
        """Write ``messages`` (``(exchange, routing_key, body, headers, props,
        mandatory)`` each), in order, with one system call where the lean path applies
        to all of them; the link must be up."""
        data = []
        for message in messages:
            frames = self.frames(*message)
            if frames is None:
                for message in messages:
                    self._send(*message)
                return
            data.append(frames)
        link = self.link
        link.write(link.fast.send, b''.join(data))
        self.stats.published += len(data)

    def publish(self, exchange, routing_key, body, headers=None, props=None,
                mandatory=False, deadline=None, buffer=True, ensured=False):
        """Send now, or keep in the buffer while no broker is reachable.

        Order is kept: while older messages wait in the buffer, new ones
        queue behind them. With ``buffer=False`` (queries) a missing
        connection raises NotConnected instead. ``ensured``: the caller has just
        made sure the link is up.
        """
        link = self.link
        if buffer and self._buffer:
            if link.connected:
                self._flush(link)
            if self._buffer:
                return self._keep(exchange, routing_key, body, headers, props, mandatory)
        try:
            if not ensured:
                link.ensure(deadline)
            self._send(exchange, routing_key, body, headers, props, mandatory)
        except NotConnected:
            if not buffer:
                raise
            self._keep(exchange, routing_key, body, headers, props, mandatory)

    def _keep(self, exchange, routing_key, body, headers, props, mandatory):
        if len(self._buffer) >= self.buffer_size:
            raise BufferFull('no broker reachable and %d messages already buffered; '
                             'message to %r/%r not kept' % (len(self._buffer), exchange,
                                                           routing_key))
        self._buffer.append((exchange, routing_key, body, headers, props, mandatory))
        self.stats.buffered += 1

    def publish_confirmed(self, exchange, routing_key, body, headers=None, props=None,
                          mandatory=False, deadline=None):
        """Send and wait for the broker's confirm; re-send after a lost connection.

        A nack (e.g. a quorum queue electing a new leader after a node died) is
        retried with back-off too. Raises PublishNacked (still refused at the
        deadline), UnknownExchange, or NotConnected when the deadline passes
        without a confirm (the message may then be on the broker or not).
        """
        link = self.link
        backoff = 0.05
        while True:
            link.ensure(deadline, wait=True)
            if self._confirm is None:  # transports without confirms (memory://)
                self._send(exchange, routing_key, body, headers, props, mandatory)
                self.stats.confirmed += 1
                return True
            self.verify(exchange)
            result = AsyncResult()
            channel = self._confirm
            try:
                with link._wlock:
                    if not link.connected:
                        continue
                    self._seq += 1
                    self._confirms[self._seq] = result
                    self._send(exchange, routing_key, body, headers, props, mandatory,
                               channel=self._confirm)
                if not link.wait(result, deadline):
                    raise NotConnected('no confirm from the broker for %r/%r before the '
                                       'deadline' % (exchange, routing_key))
                return result.get(block=False)
            except ConnectionLost:
                if monotonic() >= deadline:
                    raise
                log.warning('re-sending unconfirmed message to %r/%r after a lost connection',
                            exchange, routing_key)
            except PublishNacked:
                if monotonic() + backoff >= deadline:
                    raise
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                if link.connected and self._confirm is channel:  # once for many nacks
                    self._renew_confirm_channel()
