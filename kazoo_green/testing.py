"""A fake ``KSR`` module: test Kamailio (app_python3 / KEMI) scripts without Kamailio.

``FakeKSR`` stands in for the C module ``KSR`` and records what a script did: replies
sent (code, reason, ``sl`` or ``tm``), pseudo-variables, htables, log lines, and the
tm transactions it created, suspended and continued. Install it before the script
imports ``KSR``::

    from kazoo_green.testing import fake_ksr

    with fake_ksr() as fake:
        import router                      # the script's `import KSR` gets the fake
        fake.handler = router.mod_init()   # what t_continue resumes into
        msg = fake.request('INVITE', ruri_user='alice', from_user='bob')
        fake.handler.ksr_request_route(msg)
        assert fake.replies[-1].code == 302
        assert fake.replies[-1].ruri == 'sip:alice@10.0.0.1'   # 3xx Contact

For ``kemi.Kazoo.async_query`` also run the consumer process's body in a greenlet
(``gevent.spawn(fake.handler.kazoo_consumer, None)``, killed at the end): the resume
(``t_continue``) then happens there, and ``fake.replies`` gets the reply once it ran.

What is simulated, and how:

* ``request(...)`` starts a new SIP request: its pseudo-variables (``$rm``, ``$ru``,
  ``$rU``, ``$rd``, ``$fU``, ``$tU``, ``$td``, ``$ci``, ``$hdr(Contact)``, ...) become
  what ``KSR.pv`` reads and writes. Setting ``$ru`` updates ``$rU``/``$rd`` and back.
* ``tm.t_newtran()`` and ``tmx.t_suspend()`` give the current request a transaction
  ``(index, label)`` (``$T(id_index)``, ``$T(id_label)``); the transaction keeps its
  request, so a ``$ru`` set after a resume is that transaction's own.
* ``tm.t_set_fr(fr_inv, fr)`` and ``tm.t_on_failure(name)`` are kept by the transaction:
  a suspended one still suspended ``fr`` ms later runs ``getattr(fake.handler, name)(msg)``
  (tm's failure route; a greenlet timer here), then gets a 408 unless it replied.
  ``tm.t_reset_fr()`` forgets ``fr`` (nothing expires); ``t_on_failure('')`` clears it.
* ``tmx.t_continue(index, label, method)`` runs ``getattr(fake.handler, method)(msg)``
  synchronously, with the transaction's request current, once: a transaction that is
  not suspended (never was, or already continued) gives -1. Every call is recorded in
  ``continues``; an exception raised by the method is kept in ``errors`` (and logged at
  ``err``) instead of propagating, as in Kamailio.
* Every reply is recorded with the ``$ru`` of its request at that moment (Kamailio
  writes a 3xx reply's Contact from it) and the headers given to
  ``hdr.append_to_reply``. A transaction takes one final reply; a second gives -1.
* ``KSR.err/warn/notice/info/dbg/crit(text)`` go to ``logs`` as ``(level, text)``;
  ``htable.sht_sets/sht_seti/sht_get/sht_rm`` use ``htables``; ``pua_json.publish(json)``
  appends the parsed payload to ``pua_published`` (-1 for text that is no JSON object).
* ``counters.add/inc/reset`` (Kamailio's counters module) keep ``counter_values``
  (``group.name`` -> the value of this one process); a name not declared in ``declared``
  gives -1 and an error line, as in Kamailio. ``$def(NAME)`` reads ``defines``;
  ``xhttp_prom.histogram_observe_l1/l0`` append ``(value, label)`` to
  ``observations[name]``. ``declare_kazoo_green_stats()`` declares what
  ``kazoo-green kamailio-cfg`` would (kazoo_green's statistics then get pushed).
* ``results`` forces the return value of a call named as in ``calls`` and skips its
  action, e.g. ``fake.results['tmx.t_suspend'] = -1``.

There is one current request for the whole process (``fake.msg``), as in one Kamailio
process; t_continue swaps the transaction's request in for the duration of the call.
"""

import itertools
import re
import sys
import traceback
from collections import namedtuple
from contextlib import contextmanager

__all__ = ['FakeKSR', 'Message', 'Transaction', 'Reply', 'Continue', 'install_fake_ksr',
           'uninstall_fake_ksr', 'fake_ksr']

#: One reply sent: ``api`` is ``'sl'`` or ``'tm'``; ``ruri`` the request's ``$ru`` then;
#: ``transaction`` its ``(index, label)`` or None.
Reply = namedtuple('Reply', 'code reason api ruri headers call_id transaction')
#: One ``t_continue`` call and what it returned (1, or -1 when nothing was resumed).
Continue = namedtuple('Continue', 'index label method result')

_LEVELS = ('err', 'warn', 'notice', 'info', 'dbg', 'crit')
_URI = re.compile(r'^(?:sips?|tel):(?:([^@;>]*)@)?([^;:>?]*)')


class Message(object):
    """One simulated SIP request: its pseudo-variables (``pv``) and its transaction."""

    def __init__(self, pv=None):
        self.pv = {}
        self.reply_headers = []
        self.transaction = None
        for name, value in (pv or {}).items():
            self.set(name, value)

    def get(self, name):
        if name.startswith('$hdr('):
            wanted = name.lower()
            for key, value in self.pv.items():
                if key.lower() == wanted:
                    return value
            return None
        return self.pv.get(name)

    def set(self, name, value):
        pv = self.pv
        if value is None:
            pv.pop(name, None)
        else:
            pv[name] = value
        # The R-URI and its parts stay consistent, as in Kamailio.
        if name == '$ru':
            match = _URI.match(value or '')
            pv['$rU'], pv['$rd'] = (match.group(1), match.group(2)) if match else (None, None)
        elif name in ('$rU', '$rd') and pv.get('$rd'):
            user = pv.get('$rU')
            pv['$ru'] = 'sip:%s%s' % (user + '@' if user else '', pv['$rd'])

    def __repr__(self):
        return '<Message %s %s>' % (self.pv.get('$rm'), self.pv.get('$ru'))


class Transaction(object):
    """A tm transaction: its ids, its request, and where it is in its life."""

    def __init__(self, index, label, msg):
        self.index = index
        self.label = label
        self.msg = msg
        self.suspended = False
        self.resumed = False
        self.final_code = None
        self.fr = None           # t_set_fr's final-response timeout, seconds
        self.on_failure = None   # t_on_failure's route
        self.expired = False     # the timer fired while it was suspended

    def __repr__(self):
        state = 'suspended' if self.suspended else 'resumed' if self.resumed else 'active'
        return '<Transaction %d:%d %s>' % (self.index, self.label, state)


class _Api(object):
    def __init__(self, fake):
        self._fake = fake


class _PV(_Api):
    def get(self, name):
        fake = self._fake
        if name in ('$T(id_index)', '$T(id_label)'):
            t = fake.msg.transaction
            if t is None:
                return None
            return t.index if name == '$T(id_index)' else t.label
        if name.startswith('$def(') and name.endswith(')'):
            return fake.defines.get(name[5:-1])
        return fake.msg.get(name)

    def gete(self, name):
        value = self.get(name)
        return '' if value is None else value

    def getw(self, name):
        value = self.get(name)
        return '<null>' if value is None else value

    def is_null(self, name):
        return self.get(name) is None

    def sets(self, name, value):
        self._fake._call('pv.sets', name, value)
        self._fake.msg.set(name, str(value))

    def seti(self, name, value):
        self._fake._call('pv.seti', name, value)
        self._fake.msg.set(name, int(value))

    def unset(self, name):
        self._fake._call('pv.unset', name)
        self._fake.msg.set(name, None)


class _Counters(_Api):
    def add(self, name, value):
        fake = self._fake
        name = str(name)
        if fake.declared is not None and name not in fake.declared:
            fake._log('err', 'counter %s does not exist (forgot to define it?)\n' % name)
            return -1
        fake.counter_values[name] = fake.counter_values.get(name, 0) + int(value)
        return 1

    def inc(self, name):
        return self.add(name, 1)

    def reset(self, name):
        if self.add(name, 0) < 0:
            return -1
        self._fake.counter_values[str(name)] = 0
        return 1


class _XHttpProm(_Api):
    def histogram_observe_l0(self, name, number):
        return self.histogram_observe_l1(name, number, None)

    def histogram_observe_l1(self, name, number, label):
        self._fake.observations.setdefault(str(name), []).append((float(number), label))
        return 1


class _SL(_Api):
    def sl_send_reply(self, code, reason):
        return self._fake._reply('sl', 'sl.sl_send_reply', code, reason)

    def send_reply(self, code, reason):
        """Stateful when the request has a transaction, else stateless (as in sl)."""
        api = 'tm' if self._fake.msg.transaction is not None else 'sl'
        return self._fake._reply(api, 'sl.send_reply', code, reason)


class _TM(_Api):
    def t_newtran(self):
        fake = self._fake
        forced = fake._call('tm.t_newtran')
        if forced is not None:
            return forced
        fake._transaction()
        return 1

    def t_reply(self, code, reason):
        return self._fake._reply('tm', 'tm.t_reply', code, reason)

    def t_set_fr(self, fr_inv, fr):
        fake = self._fake
        forced = fake._call('tm.t_set_fr', fr_inv, fr)
        if forced is not None:
            return forced
        fake._transaction().fr = fr / 1000.0
        return 1

    def t_on_failure(self, name):
        fake = self._fake
        forced = fake._call('tm.t_on_failure', name)
        if forced is not None:
            return forced
        fake._transaction().on_failure = str(name)
        return 1

    def t_reset_fr(self):
        """Back to the configured timers (the fake's: none; nothing expires)."""
        fake = self._fake
        forced = fake._call('tm.t_reset_fr')
        if forced is not None:
            return forced
        fake._transaction().fr = None
        return 1

    def t_send_reply(self, code, reason):
        return self._fake._reply('tm', 'tm.t_send_reply', code, reason)


class _TMX(_Api):
    def t_suspend(self):
        fake = self._fake
        forced = fake._call('tmx.t_suspend')
        if forced is not None:
            return forced
        t = fake._transaction()
        t.suspended = True
        if t.fr is not None:
            # tm's final-response timer on the blind branch t_suspend adds.
            import gevent
            gevent.spawn_later(t.fr, fake._expire, t)
        return 1

    def t_continue(self, index, label, method):
        """Run ``handler.<method>(msg)`` for a suspended transaction, once."""
        fake = self._fake
        forced = fake._call('tmx.t_continue', index, label, method)
        t = fake.transactions.get((index, label))
        if forced is not None:
            result = forced
        elif t is None or not t.suspended:
            result = -1
        else:
            result = 1
        fake.continues.append(Continue(index, label, method, result))
        if result < 0 or forced is not None:
            return result
        t.suspended = False
        t.resumed = True
        previous, fake.msg = fake.msg, t.msg
        try:
            getattr(fake.handler, method)(t.msg)
        except Exception as exc:  # Kamailio logs it; the caller only sees t_continue's result
            fake.errors.append(exc)
            fake._log('err', 'exception in %s: %s' % (method, traceback.format_exc()))
        finally:
            fake.msg = previous
        return result


class _HTable(_Api):
    def _table(self, table):
        return self._fake.htables.setdefault(table, {})

    def sht_sets(self, table, key, value):
        self._fake._call('htable.sht_sets', table, key, value)
        self._table(table)[key] = str(value)
        return 1

    def sht_seti(self, table, key, value):
        self._fake._call('htable.sht_seti', table, key, value)
        self._table(table)[key] = int(value)
        return 1

    def sht_get(self, table, key):
        return self._fake.htables.get(table, {}).get(key)

    def sht_rm(self, table, key):
        self._fake._call('htable.sht_rm', table, key)
        self._fake.htables.get(table, {}).pop(key, None)
        return 1


class _Hdr(_Api):
    def append_to_reply(self, text):
        self._fake._call('hdr.append_to_reply', text)
        self._fake.msg.reply_headers.append(text)
        return 1


class _PuaJson(_Api):
    def publish(self, text):
        """pua_json's publish: the JSON text kept in ``fake.pua_published`` (parsed); -1
        for text that is not a JSON object, as pua_json."""
        import json
        fake = self._fake
        forced = fake._call('pua_json.publish', text)
        if forced is not None:
            return forced
        try:
            payload = json.loads(text)
        except ValueError:
            return -1
        if not isinstance(payload, dict):
            return -1
        fake.pua_published.append(payload)
        return 1


class FakeKSR(object):
    """Stands in for Kamailio's ``KSR`` module and records what was done with it.

    Recorded: ``replies`` (Reply), ``continues`` (Continue), ``transactions``
    (``(index, label)`` -> Transaction), ``htables`` (table -> {key: value}), ``logs``
    (``(level, text)``), ``calls`` (every action as ``(name, args)``, e.g.
    ``('tmx.t_suspend', ())``; reads and logs are not recorded) and ``errors``
    (exceptions raised by the methods t_continue ran).
    """

    def __init__(self, handler=None):
        #: The object ``mod_init()`` returned: t_continue calls its methods.
        self.handler = handler
        #: The current request (see ``request``).
        self.msg = Message()
        self.results = {}
        self.replies = []
        self.continues = []
        self.transactions = {}
        self.htables = {}
        self.logs = []
        self.calls = []
        self.errors = []
        self._index = itertools.count(1)
        self._label = itertools.count(1000, 7)
        self._call_ids = itertools.count(1)
        self.pv = _PV(self)
        self.sl = _SL(self)
        self.tm = _TM(self)
        self.tmx = _TMX(self)
        self.htable = _HTable(self)
        self.hdr = _Hdr(self)
        #: Payloads given to ``pua_json.publish`` (kazoo_green.pua), parsed.
        self.pua_published = []
        self.pua_json = _PuaJson(self)
        #: ``#!define`` values, read as ``$def(NAME)``.
        self.defines = {}
        #: Counter values (``group.name`` -> int) and the declared names (None: any).
        self.counter_values = {}
        self.declared = set()
        #: xhttp_prom histogram name -> [(value, label)].
        self.observations = {}
        self.counters = _Counters(self)
        self.xhttp_prom = _XHttpProm(self)

    # -- the test's side ------------------------------------------------
    def request(self, method='INVITE', ruri_user='alice', ruri_domain='127.0.0.1',
                from_user='bob', from_domain=None, to_user=None, to_domain=None,
                call_id=None, contact=None, headers=None, source='127.0.0.1', **pv):
        """Start a new request (the current one from now on) and return it.

        ``to_*`` default to the R-URI's, ``from_domain`` to ``ruri_domain``, ``contact``
        to ``<sip:from_user@source:5060>``; ``headers`` (name -> value) become
        ``$hdr(name)``; other pseudo-variables go in ``pv`` by name without ``$``
        (``fake.request(si='10.0.0.9')``) or in a dict: ``**{'$avp(x)': 1}``.
        """
        from_domain = from_domain or ruri_domain
        to_user = ruri_user if to_user is None else to_user
        to_domain = to_domain or ruri_domain
        values = {
            '$rm': method,
            '$ru': 'sip:%s%s' % (ruri_user + '@' if ruri_user else '', ruri_domain),
            '$fu': 'sip:%s@%s' % (from_user, from_domain), '$fU': from_user,
            '$fd': from_domain,
            '$tu': 'sip:%s%s' % (to_user + '@' if to_user else '', to_domain),
            '$tU': to_user or None, '$td': to_domain,
            '$ci': call_id or 'fake-call-%d' % next(self._call_ids),
            '$si': source, '$sp': 5060,
            '$hdr(Contact)': contact or '<sip:%s@%s:5060>' % (from_user, source),
        }
        for name, value in (headers or {}).items():
            values['$hdr(%s)' % name] = value
        for name, value in pv.items():
            values[name if name.startswith('$') else '$' + name] = value
        self.msg = Message(values)
        return self.msg

    def declare_kazoo_green_stats(self, histograms=True):
        """Declare kazoo_green's counters (and histograms), as an include of
        ``kazoo-green kamailio-cfg`` (with WITH_KAZOO_GREEN_PROM) does."""
        from . import _kamstats
        self.defines[_kamstats.STATS_DEFINE] = '"%s"' % _kamstats.SCHEMA
        self.declared.update('%s.%s' % (_kamstats.GROUP, n)
                             for n in _kamstats.NAMES + (_kamstats.PUSHES[0],))
        if histograms:
            self.defines[_kamstats.HISTOGRAMS_DEFINE] = '"%s"' % _kamstats.SCHEMA

    def transaction(self, msg=None):
        """The transaction of ``msg`` (default: the current request), or None."""
        return (msg or self.msg).transaction

    def log_lines(self, level=None):
        """Log texts (trailing newline removed) of ``level``, or of every level."""
        return [text.rstrip('\n') for lvl, text in self.logs if level in (None, lvl)]

    def replies_to(self, call_id):
        return [r for r in self.replies if r.call_id == call_id]

    # -- internals ------------------------------------------------------
    def _call(self, name, *args):
        """Record an action; returns the forced result for it, if any."""
        self.calls.append((name, args))
        return self.results.get(name)

    def _log(self, level, text):
        self.logs.append((level, text))

    def _expire(self, t):
        """tm's timer fired: a still-suspended transaction runs its failure route (in
        Kamailio: in the timer process), then gets a 408 unless the route replied."""
        if not t.suspended:
            return
        t.suspended = False
        t.expired = True
        previous, self.msg = self.msg, t.msg
        try:
            if t.on_failure:
                getattr(self.handler, t.on_failure)(t.msg)
        except Exception as exc:
            self.errors.append(exc)
            self._log('err', 'exception in %s: %s' % (t.on_failure, traceback.format_exc()))
        finally:
            if t.final_code is None:
                self._reply('tm', 'tm.timeout', 408, 'Request Timeout')
            self.msg = previous

    def _transaction(self):
        msg = self.msg
        if msg.transaction is None:
            t = Transaction(next(self._index), next(self._label), msg)
            msg.transaction = t
            self.transactions[(t.index, t.label)] = t
        return msg.transaction

    def _reply(self, api, name, code, reason):
        msg = self.msg
        forced = self._call(name, code, reason)
        if forced is not None:
            return forced
        t = msg.transaction
        if api == 'tm':
            if t is None:
                self._log('err', 'fake tm: t_reply(%s) without a transaction\n' % code)
                return -1
            if t.final_code is not None:
                self._log('err', 'fake tm: t_reply(%s) after the final reply %s\n'
                          % (code, t.final_code))
                return -1
            if int(code) >= 200:
                t.final_code = int(code)
        self.replies.append(Reply(int(code), reason, api, msg.get('$ru'),
                                  list(msg.reply_headers), msg.get('$ci'),
                                  (t.index, t.label) if t is not None else None))
        return 1

    def __repr__(self):
        return '<FakeKSR %d replies, %d transactions>' % (len(self.replies),
                                                         len(self.transactions))


def _logger(level):
    def log(self, text):
        self._log(level, text)
    log.__name__ = level
    log.__doc__ = 'KSR.%s(text): recorded in ``logs`` as (%r, text).' % (level, level)
    return log


for _level in _LEVELS:
    setattr(FakeKSR, _level, _logger(_level))
del _level


_MISSING = object()
_saved = []


def install_fake_ksr(handler=None):
    """Put a new FakeKSR in ``sys.modules['KSR']`` and return it."""
    fake = FakeKSR(handler)
    _saved.append(sys.modules.get('KSR', _MISSING))
    sys.modules['KSR'] = fake
    return fake


def uninstall_fake_ksr():
    """Undo the last ``install_fake_ksr`` (what was ``KSR`` before comes back)."""
    previous = _saved.pop() if _saved else _MISSING
    if previous is _MISSING:
        sys.modules.pop('KSR', None)
    else:
        sys.modules['KSR'] = previous


@contextmanager
def fake_ksr(handler=None):
    """``with fake_ksr() as fake:``: a FakeKSR installed for the block."""
    fake = install_fake_ksr(handler)
    try:
        yield fake
    finally:
        uninstall_fake_ksr()
