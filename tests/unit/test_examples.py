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
