"""One zone's connections: where its publishes, queries and subscriptions go.

Every zone has one publishing link: one connection at a time, failing over
round-robin over the zone's brokers, whatever the zone's shape (a cluster's nodes
are one broker seen through any of them; of standalone brokers "the first one open"
is used, as by the C module). It carries the zone's publishes and queries and its
reply queue.

Consuming depends on the shape (see _topology):

* ``cluster``: one consuming link with the same failover; each subscription is one
  queue, whichever node holds the connection.
* ``standalone``: one consuming link per broker, each tied to its broker (it
  reconnects to it, never to another): every subscription is consumed from every
  broker, since an event published on one never reaches the others. Each of these
  links also carries a reply queue bound with this process's Server-ID (a reply
  published on any broker of the zone comes back) and a publisher, so that a reply
  to a request consumed there goes back through the broker that delivered it.
"""

from ._consume import Subscriber
from ._link import Link
from ._publish import Publisher
from ._query import ReplyWaiter

__all__ = ['Zone', 'Feed']


class Feed(object):
    """One consuming connection of a zone and what runs on it."""

    __slots__ = ('link', 'subscriber', 'publisher')

    def __init__(self, link, subscriber, publisher=None):
        self.link = link
        self.subscriber = subscriber
        #: standalone brokers only: replies through this very connection.
        self.publisher = publisher


class Zone(object):
    """The links of one zone (``spec``: a _topology.ZoneSpec)."""

    def __init__(self, spec, stats, node, link_args, publish_buffer, direct_reply_to,
                 dispatcher, routes, prefetch, event_keys):
        self.name = spec.name
        self.shape = spec.shape
        self.urls = list(spec.urls)
        standalone = spec.shape == 'standalone'
        if standalone and len(self.urls) > 1:
            # Replies may come through any broker: a caller-driven query reads them all
            # while it waits (ReplyWaiter._watch), which the blocking lane cannot.
            link_args = dict(link_args, blocking=False)
        self.pub_link = Link('publish', self.urls, stats, zone=self.name, **link_args)
        self.publisher = Publisher(self.pub_link, stats, publish_buffer)
        self.replies = ReplyWaiter(self.pub_link, self.publisher, stats, node,
                                   direct_reply_to=direct_reply_to,
                                   shared_key=standalone and len(self.urls) > 1)
        if standalone and len(self.urls) > 1:
            for url in self.urls:
                via = Link('replies', [url], stats, zone=self.name, **link_args)
                via.add_up_hook(self.replies.listener(via))
                self.replies.via_links.append(via)
        groups = [[url] for url in self.urls] if standalone else [self.urls]
        self.feeds = []
        for urls in groups:
            link = Link('consume', urls, stats, zone=self.name, **link_args)
            publisher = None
            if standalone and len(self.urls) > 1:
                publisher = Publisher(link, stats, publish_buffer)
                link.add_up_hook(self.replies.listener(link))
            subscriber = Subscriber(link, dispatcher, routes, stats, node, prefetch,
                                    via=publisher, event_keys=event_keys)
            self.feeds.append(Feed(link, subscriber, publisher))

    @property
    def links(self):
        """The publishing and consuming links (not the reply-only ones of standalone
        brokers, which only a caller-driven query uses)."""
        return [self.pub_link] + [feed.link for feed in self.feeds]

    def consume_links(self):
        """The consuming links that have something to consume."""
        return [feed.link for feed in self.feeds if feed.subscriber.subscriptions
                or feed.publisher is not None]

    def __repr__(self):
        return '<Zone %s %s %s>' % (self.name, self.shape, ', '.join(self.urls))
