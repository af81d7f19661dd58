"""sipp scenarios and a sipp runner for the Kazoo node example (tests/e2e/test_kazoo_node.py,
bench/register.py). Digest credentials come from sipp's ``-au``/``-ap``
(``[authentication]``); the SIP user is ``-s``; every domain is ``DOMAIN`` unless given."""

import os
import re
import subprocess
import tempfile
import time

from . import harness

DOMAIN = 'example.com'

_HEAD = '''<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="%s">
'''

_REGISTER = '''  <send%(rtd)s>
    <![CDATA[

      REGISTER sip:%(domain)s SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:[service]@%(domain)s>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@%(domain)s>
      Call-ID: [call_id]
      CSeq: %(cseq)d REGISTER
      Contact: <sip:[service]@[local_ip]:[local_port]>
      %(auth)sExpires: %(expires)d
      User-Agent: kazoo-green-e2e
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
'''

_CHALLENGE_CHECK = '''    <action>
      <ereg regexp="realm=&quot;%s&quot;" search_in="hdr" header="%s:" check_it="true"
            assign_to="1"/>
    </action>
'''


def _recv(code, rtd='', check=''):
    if check:
        return '  <recv response="%s"%s auth="true">\n%s  </recv>\n' % (code, rtd, check)
    return '  <recv response="%s"%s%s/>\n' % (code, rtd, ' auth="true"' if code in (
        '401', '407') else '')


def register(final='200', domain=DOMAIN, expires=3600, challenged=True, check_realm=False):
    """REGISTER, then (``challenged``) the 401 and the REGISTER with credentials, ending
    with ``final``. ``challenged=False``: one REGISTER sent with credentials at once is not
    possible (no nonce), so it means: the REGISTER without credentials, expecting
    ``final`` (401)."""
    xml = _HEAD % 'register'
    xml += _REGISTER % {'domain': domain, 'cseq': 1, 'auth': '', 'expires': expires,
                        'rtd': ' start_rtd="1"'}
    check = _CHALLENGE_CHECK % (re.escape(domain), 'WWW-Authenticate') if check_realm else ''
    if not challenged:
        xml += _recv(final, ' rtd="1"', check)
        if check:
            xml += '  <Reference variables="1"/>\n'
        return xml + '</scenario>\n'
    xml += _recv('401', '', check)
    xml += _REGISTER % {'domain': domain, 'cseq': 2, 'auth': '[authentication]\n      ',
                        'expires': expires, 'rtd': ''}
    xml += _recv(final, ' rtd="1"')
    if check:
        xml += '  <Reference variables="1"/>\n'
    return xml + '</scenario>\n'


_INVITE = '''  <send%(rtd)s>
    <![CDATA[

      INVITE sip:%(callee)s@%(domain)s SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:[service]@%(domain)s>;tag=[pid]SIPpTag00[call_number]
      To: <sip:%(callee)s@%(domain)s>
      Call-ID: [call_id]
      CSeq: %(cseq)d INVITE
      Contact: <sip:[service]@[local_ip]:[local_port]>
      %(auth)sMax-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
'''

_ACK = '''  <send>
    <![CDATA[

      ACK sip:%(callee)s@%(domain)s SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch-%(back)d]
      From: <sip:[service]@%(domain)s>;tag=[pid]SIPpTag00[call_number]
      To: <sip:%(callee)s@%(domain)s>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: %(cseq)d ACK
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
'''


def invite(final, callee='bob', domain=DOMAIN):
    """INVITE, 407, ACK, INVITE with credentials, [100], ``final``, ACK (the ACK of a
    negative reply takes its INVITE's branch: [branch-N], N messages back)."""
    v = {'callee': callee, 'domain': domain}
    xml = _HEAD % 'invite'
    xml += _INVITE % dict(v, cseq=1, auth='', rtd=' start_rtd="1"')
    xml += _recv('407')
    xml += _ACK % dict(v, cseq=1, back=2)
    xml += _INVITE % dict(v, cseq=2, auth='[authentication]\n      ', rtd='')
    xml += '  <recv response="100" optional="true"/>\n'
    xml += _recv(final, ' rtd="1"')
    xml += _ACK % dict(v, cseq=2, back=3)
    return xml + '</scenario>\n'


def media_server(final=486):
    """A media server's side: an INVITE whose X-AUTH-Token is logged (sipp -trace_logs),
    answered ``final``, its ACK."""
    return (_HEAD % 'media') + '''  <recv request="INVITE">
    <action>
      <ereg regexp="^ *([^ ]+)$" search_in="hdr" header="X-AUTH-Token:" check_it="true"
            assign_to="1,token"/>
      <log message="X-AUTH-Token [$token]"/>
    </action>
  </recv>
  <send>
    <![CDATA[

      SIP/2.0 %d Busy Here
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
  <recv request="ACK"/>
  <Reference variables="1"/>
</scenario>
''' % final


_OK = '''  <send>
    <![CDATA[

      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

    ]]>
  </send>
'''


def subscribe(event, accept, body_regexp, domain=DOMAIN, watcher='watcher'):
    """SUBSCRIBE ``event`` to ``[service]@domain``: 200, the initial NOTIFY (answered),
    then a NOTIFY whose body matches ``body_regexp`` (a sipp ereg, XML-escaped here)."""
    escaped = (body_regexp.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')
               .replace('"', '&quot;'))
    return (_HEAD % 'subscribe') + '''  <send>
    <![CDATA[

      SUBSCRIBE sip:[service]@%(domain)s SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:%(watcher)s@%(domain)s>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@%(domain)s>
      Call-ID: [call_id]
      CSeq: 1 SUBSCRIBE
      Contact: <sip:%(watcher)s@[local_ip]:[local_port]>
      Event: %(event)s
      Accept: %(accept)s
      Expires: 120
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
  <recv request="NOTIFY"/>
%(ok)s  <recv request="NOTIFY">
    <action>
      <ereg regexp="%(regexp)s" search_in="body" check_it="true" assign_to="1"/>
    </action>
  </recv>
%(ok)s  <Reference variables="1"/>
</scenario>
''' % {'domain': domain, 'watcher': watcher, 'event': event, 'accept': accept,
       'regexp': escaped, 'ok': _OK}


_ports = [5300]


class Sipp(object):
    """One sipp process (client, or with ``server=True`` a UAS on ``port``), its traces
    in a directory of its own: results when done, messages while it runs."""

    def __init__(self, scenario_xml, service='alice', user=None, password=None, calls=1,
                 rate=10, port=None, server=False, max_seconds=30, extra=()):
        if port is None:
            _ports[0] = 5300 + (_ports[0] - 5299) % 300
            port = _ports[0]
        self.workdir = tempfile.mkdtemp(prefix='kgnode-sipp-')
        path = os.path.join(self.workdir, 'scenario.xml')
        with open(path, 'w') as f:
            f.write(scenario_xml)
        cmd = ['sipp', '-sf', path, '-i', '127.0.0.1', '-p', str(port), '-m', str(calls),
               '-nostdin', '-trace_screen', '-trace_err', '-trace_msg', '-trace_logs',
               '-trace_rtt', '-rtt_freq', '1', '-timeout', '%ds' % max_seconds,
               '-timeout_error']
        if not server:
            cmd[1:1] = ['127.0.0.1:%d' % harness.SIP_PORT]
            cmd += ['-s', service, '-r', str(rate), '-l', str(max(rate * 5, 10)),
                    '-recv_timeout', '10000']
        if user is not None:
            cmd += ['-au', user, '-ap', password or '']
        self.max_seconds = max_seconds
        self.proc = subprocess.Popen(cmd + list(extra), cwd=self.workdir,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._result = None

    def wait(self):
        if self._result is None:
            out, err = self.proc.communicate(timeout=self.max_seconds + 30)
            self._result = harness._parse(self.workdir, _Done(self.proc.returncode, out, err))
            self._result.workdir = self.workdir
        return self._result

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def _read(self, suffix):
        text = ''
        for name in os.listdir(self.workdir):
            if name.endswith(suffix):
                with open(os.path.join(self.workdir, name), errors='replace') as f:
                    text += f.read()
        return text

    def messages(self):
        """What sipp sent and received so far (its -trace_msg file)."""
        return self._read('_messages.log')

    def logs(self):
        """The scenario's <log> lines (-trace_logs)."""
        return self._read('_logs.log')

    def received(self, start_line):
        """Received messages starting with ``start_line`` (e.g. 'NOTIFY'), in order."""
        found = []
        for part in re.split(r'(?m)^-+ \d{4}-\d\d-\d\d [\d:.]+\n', self.messages()):
            header, _, message = part.partition('\n')
            message = message.lstrip()
            if 'message received' in header and message.startswith(start_line):
                found.append(message.replace('\r\n', '\n'))
        return found

    def wait_for(self, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self):
                return True
            if self.proc.poll() is not None:
                return predicate(self)
            time.sleep(0.05)
        return predicate(self)


class _Done(object):
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
