"""The README's demo and the broker-free example keep working."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(*args):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_demo_on_memory_transport():
    result = run(sys.executable, '-m', 'kazoo_green', 'demo')
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert '[query]   route.req To=alice -> Route=sip:alice@127.0.0.1:5090' in out
    assert 'To=unknown-bob -> Route=(none)' in out
    assert 'kazoo:consumer-event-presence-update (late ack): alice is busy' in out
    assert 'kazoo:consumer-event-directory (early ack' in out
    assert 'rejected=1' in out and out.rstrip().endswith('done')


def test_quickstart_example():
    result = run(sys.executable, 'examples/quickstart.py')
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        'presence: alice is busy (routing key update.alice)',
        'route for bob: sip:bob@127.0.0.1:5090',
        'json_path: sip:fs1',
        'encode: alice%40example%2Ecom',
    ]


def test_docstring_examples():
    import doctest
    import importlib
    for name in ('kazoo_green.runtime', 'kazoo_green.wire', 'kazoo_green._stats'):
        module = importlib.import_module(name)
        failed, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert failed == 0, name


def _fake_kazoo():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'fake_kazoo', os.path.join(ROOT, 'examples', 'fake_kazoo.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fake_kazoo_answers_authn_as_kazoo_does():
    fake = _fake_kazoo()
    users = {('alice', 'example.com'): 'secret'}
    reply = fake.authn_reply({'Auth-User': 'alice', 'Auth-Realm': 'example.com'}, users)
    assert (reply['Event-Name'], reply['Auth-Password']) == ('authn_resp', 'secret')
    account, device = fake.ids('alice', 'example.com')
    assert reply['Custom-Channel-Vars']['Account-ID'] == account
    assert reply['Custom-Channel-Vars']['Authorizing-ID'] == device
    assert len(account) == len(device) == 32 and account != device
    other = fake.authn_reply({'Auth-User': 'bob', 'Auth-Realm': 'example.com'}, users)
    assert other == {'Event-Category': 'directory', 'Event-Name': 'authn_err'}
    anyone = fake.authn_reply({'Auth-User': 'bob', 'Auth-Realm': 'example.com'}, users,
                              {'example.com': 'pw'})
    assert anyone['Auth-Password'] == 'pw'
    beat = fake.advertise_payload('fk@x', ['sip:mod_sofia@10.0.0.1:5060'], 5000)
    assert beat['Media-Servers']['fake-media-1']['Interfaces']['sipinterface_1']['info'] == {
        'url': 'sip:mod_sofia@10.0.0.1:5060'}
    assert beat['Expires'] == 5000


def test_fake_kazoo_command_line_rejects_malformed_users():
    result = run(sys.executable, 'examples/fake_kazoo.py', 'serve', '--user', 'alice@x')
    assert result.returncode == 2 and 'user:password@realm' in result.stderr
