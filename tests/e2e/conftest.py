"""Fixtures shared by the end-to-end tests."""

import pytest


@pytest.fixture(scope='module')
def logdir(tmp_path_factory, request):
    """A directory for one test module's Kamailio, responder and sipp logs (kept)."""
    name = request.module.__name__.rsplit('.', 1)[-1]
    path = tmp_path_factory.mktemp(name + '-logs')
    yield path
    print('\n%s logs in %s' % (name, path))
