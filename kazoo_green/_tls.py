"""TLS options: what ``Kazoo(ssl=...)`` accepts, and what each broker connection gets.

kombu and py-amqp take ``ssl=True`` or a dict of options for py-amqp's SSL transport;
this keeps that convention and adds what an operator expects of production TLS:

* the peer's certificate and host name are verified unless told otherwise (as the C
  kazoo module's ``amqps_verify_peer`` / ``amqps_verify_hostname`` default to 1), with
  the system's CAs (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured) unless ``ca_certs``
  names a file;
* the host name checked is the one of the broker URL being connected, worked out again
  for every connection attempt, so it stays right after a failover (kombu's own
  ``server_hostname=None`` handling keeps the first broker's name);
* an ``amqps://`` URL uses TLS with these options, an ``amqp://`` URL only when
  ``ssl`` is given; one list may mix both;
* unknown option names fail at once (a typo must not silently drop verification).
"""

import os
import ssl as _ssl
from urllib.parse import urlsplit

__all__ = ['normalise', 'for_broker', 'from_env', 'OPTIONS', 'ENV']

#: Options passed on to py-amqp (``amqp.transport.SSLTransport``), and ``check_hostname``.
OPTIONS = frozenset(['ca_certs', 'certfile', 'keyfile', 'cert_reqs', 'server_hostname',
                     'ciphers', 'ssl_version', 'tls_minimum_version', 'tls_maximum_version',
                     'check_hostname'])


def normalise(option):
    """``Kazoo(ssl=...)`` as None (TLS only for ``amqps://`` URLs, with defaults) or a dict
    of options (TLS for every broker). Raises TypeError/ValueError for what py-amqp
    cannot take."""
    if option is None or option is False:
        return None
    if option is True:
        return {}
    if isinstance(option, _ssl.SSLContext):
        raise TypeError(
            'ssl: an ssl.SSLContext cannot reach py-amqp (its SSL transport takes True or '
            'a dict of options, and ignores anything else); pass a dict such as '
            "{'ca_certs': ..., 'certfile': ..., 'keyfile': ..., 'cert_reqs': "
            'ssl.CERT_REQUIRED}')
    if not isinstance(option, dict):
        raise TypeError('ssl must be True, False, None or a dict of options, not %r'
                        % (type(option).__name__,))
    unknown = sorted(set(option) - OPTIONS)
    if unknown:
        raise ValueError('ssl: unknown option(s) %s (known: %s)'
                         % (', '.join(unknown), ', '.join(sorted(OPTIONS))))
    return dict(option)


def uses_tls(option, url):
    return option is not None or urlsplit(url).scheme == 'amqps'


def for_broker(option, url):
    """The ``ssl`` value for kombu's Connection while it connects to ``url``: False, or
    the options dict for py-amqp (``option`` as ``normalise`` returned it)."""
    if not uses_tls(option, url):
        return False
    opts = dict(option or {})
    check = opts.pop('check_hostname', True)
    if opts.get('cert_reqs') == _ssl.CERT_NONE:
        check = False
    if not check:
        # py-amqp checks the host name exactly when server_hostname is set.
        opts.pop('server_hostname', None)
    elif opts.get('server_hostname') is None:
        opts['server_hostname'] = urlsplit(url).hostname or 'localhost'
    return opts


#: Environment variables of ``from_env``, after the C kazoo module's amqps_* parameters.
ENV = ('KAZOO_GREEN_AMQPS_CA_CERT', 'KAZOO_GREEN_AMQPS_CERT', 'KAZOO_GREEN_AMQPS_KEY',
       'KAZOO_GREEN_AMQPS_VERIFY_PEER', 'KAZOO_GREEN_AMQPS_VERIFY_HOSTNAME')


def from_env(environ=None):
    """TLS options from the environment, named after the C kazoo module's parameters
    (for Kamailio configs, where a script's settings come from its environment):

    ==================================== =====================================
    ``KAZOO_GREEN_AMQPS_CA_CERT``        CA file (``ca_certs``; default: the system's)
    ``KAZOO_GREEN_AMQPS_CERT``           client certificate (``certfile``)
    ``KAZOO_GREEN_AMQPS_KEY``            its key (``keyfile``)
    ``KAZOO_GREEN_AMQPS_VERIFY_PEER``    ``0``: do not verify the broker (default 1)
    ``KAZOO_GREEN_AMQPS_VERIFY_HOSTNAME`` ``0``: do not check its host name (default 1)
    ==================================== =====================================

    Returns None when none is set (``amqps://`` URLs then use the defaults), else the
    dict for ``Kazoo(ssl=...)``: TLS for every broker.

    >>> from_env({'KAZOO_GREEN_AMQPS_CA_CERT': '/etc/kamailio/ca.pem'})
    {'ca_certs': '/etc/kamailio/ca.pem'}
    """
    environ = os.environ if environ is None else environ
    values = dict((name, environ.get(name, '').strip()) for name in ENV)
    if not any(values.values()):
        return None
    opts = {}
    for name, key in zip(ENV[:3], ('ca_certs', 'certfile', 'keyfile')):
        if values[name]:
            opts[key] = values[name]
    if values[ENV[3]] == '0':
        opts['cert_reqs'] = _ssl.CERT_NONE
    if values[ENV[4]] == '0':
        opts['check_hostname'] = False
    return opts
