"""The Kamailio example over TLS: ``amqps://`` brokers, real Kamailio + app_python3, sipp.

Kamailio (examples/kamailio/kamailio.cfg) and the example responder both reach the TLS
node of tests/tls.py through its TLS listener only, the CA given as the C module's
``amqps_ca_cert`` is (``KAZOO_GREEN_AMQPS_CA_CERT``): sync queries in the SIP workers
(the blocking lane), async queries resumed by the consumer process, REGISTER publishes
and a subscription, all over TLS.
"""

import shutil

import pytest

import kazoo_green

from ..conftest import unique, wait_for
from ..tls import tls_broker  # noqa: F401  (fixture)
from . import harness

MISSING = [tool for tool in ('kamailio', 'kamcmd', 'sipp') if not shutil.which(tool)]


@pytest.fixture(scope='module')
def tls_env(tls_broker):  # noqa: F811
    return {'KAZOO_GREEN_BROKERS': tls_broker.amqps_url,
            'KAZOO_GREEN_AMQPS_CA_CERT': tls_broker.ca}


@pytest.fixture(scope='module')
def kamailio(logdir, tls_broker, tls_env):  # noqa: F811
    assert not MISSING, 'missing %s: run tests/tools/services.sh' % ', '.join(MISSING)
    with harness.example(logdir, 'kamailio@kgtest-%s' % unique('tls'), env=tls_env,
                         queues=harness.node_queues(tls_broker.node)) as k:
        yield k


@pytest.fixture(autouse=True)
def kamailio_stays_healthy(kamailio):
    yield
    problem = kamailio.health()
    assert problem is None, problem


@pytest.mark.parametrize('user', ['tlsalice', 'asynctlsalice'], ids=['sync', 'async'])
def test_invites_are_routed_over_tls(kamailio, user):
    result = harness.run_sipp(harness.invite_scenario(user, 302), user, calls=400, rate=200)
    print('\nTLS %s: %r' % (user, result))
    assert result.returncode == 0 and result.failed == 0, result
    assert result.counts.get('302') == 400, result


def test_register_and_presence_over_tls(kamailio, tls_broker):  # noqa: F811
    consumer = kazoo_green.Kazoo(tls_broker.amqps_url, ssl={'ca_certs': tls_broker.ca},
                                 node=unique('e2e') + '@test')
    seen = []
    consumer.add_route('kazoo:consumer-event-directory-reg-success',
                       lambda p, m: seen.append(p))
    consumer.subscribe('registrar', 'registration.success.#', exchange_type='topic')
    consumer.start()
    try:
        assert consumer.wait_connected(10)
        result = harness.run_sipp(harness.register_scenario('example.com'), 'tls.user',
                                  calls=50, rate=50)
        assert result.returncode == 0 and result.counts.get('200') == 50, result
        assert wait_for(lambda: len(seen) == 50, timeout=10), len(seen)
        assert seen[0]['Username'] == 'tls.user' and seen[0]['Node'] == kamailio.node
        consumer.publish('presence', 'update.tlsbob.example%2Ecom', {
            'Event-Category': 'presence', 'Event-Name': 'update', 'From': 'tlsbob',
            'State': 'busy'})
        assert wait_for(lambda: 'busy' in kamailio.kamcmd('htable.get', 'presence',
                                                          'tlsbob').stdout, timeout=10)
    finally:
        consumer.stop()


def test_every_connection_was_tls_and_nothing_failed(kamailio):
    log = kamailio.log()
    assert 'Traceback' not in log, log[log.find('Traceback') - 2000:][:6000]
    connected = [line for line in log.splitlines() if 'link: connected to' in line]
    assert connected and all(line.endswith('(TLS)') for line in connected), connected
    assert 'running without the fast frame path' not in log
    assert 'lost connection' not in log
