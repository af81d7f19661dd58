"""kazoo_green: Kazoo-style AMQP for Kamailio's Python scripts, on gevent + kombu.

Importing it applies ``gevent.monkey.patch_all()`` (unless the environment
sets ``KAZOO_GREEN_NO_PATCH=1``), because kombu binds blocking functions when
it is imported: import kazoo_green before kombu, or patch first yourself.
"""

import os
import sys
import warnings

if os.environ.get('KAZOO_GREEN_NO_PATCH') != '1':
    from gevent import monkey as _monkey
    if not _monkey.is_module_patched('socket'):
        if 'kombu' in sys.modules or 'amqp' in sys.modules:
            warnings.warn('kazoo_green: kombu was imported before gevent patched the '
                          'standard library; import kazoo_green first', RuntimeWarning)
        _monkey.patch_all()

from ._dispatch import Delivery  # noqa: E402
from ._version import __version__  # noqa: E402
from .errors import (  # noqa: E402
    BadMessage, BufferFull, ConnectionLost, InvalidPayload, KazooError, NotConnected,
    Overloaded, PublishNacked, QueryFailed, QueryTimeout, Unroutable, UnknownExchange,
)
from ._tls import from_env as ssl_from_env  # noqa: E402
from .runtime import Kazoo  # noqa: E402
from .wire import encode, json_path  # noqa: E402

__all__ = [
    'Kazoo', 'Delivery', 'encode', 'json_path', 'ssl_from_env', '__version__',
    'KazooError', 'InvalidPayload', 'BadMessage', 'NotConnected', 'ConnectionLost',
    'QueryTimeout', 'QueryFailed', 'Unroutable', 'UnknownExchange', 'PublishNacked',
    'BufferFull', 'Overloaded',
]
