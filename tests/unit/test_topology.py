"""The zone map: broker lists as the API takes them and as the C module's
``amqp_connection`` values can be pasted."""

import pytest

from kazoo_green import Kazoo
from kazoo_green._topology import parse_topology

A, B, C = ('amqp://guest:guest@127.0.0.1:%d//' % p for p in (5701, 5702, 5703))


def zones(brokers, **kwargs):
    specs, primary = parse_topology(brokers, **kwargs)
    return primary, {name: (spec.urls, spec.shape) for name, spec in specs.items()}


def test_a_flat_list_or_string_is_one_zone_called_local():
    assert zones([A, B]) == ('local', {'local': ([A, B], 'cluster')})
    assert zones('%s; %s;' % (A, B)) == ('local', {'local': ([A, B], 'cluster')})
    assert zones(None)[1]['local'][0] == ['amqp://guest:guest@127.0.0.1:5672//']


def test_the_c_modules_zone_entries_and_scheme_alias():
    c_entry = 'zone=dc2;kazoo://guest:guest@127.0.0.1:5702'
    assert zones([A, c_entry]) == ('local', {
        'local': ([A], 'cluster'), 'dc2': (['amqp://guest:guest@127.0.0.1:5702'], 'cluster')})
    # In one string, zone=NAME applies to the URLs after it.
    assert zones('%s;zone=dc2;%s;%s;zone=local;%s' % (A, B, C, 'kazoos://x@h:5671'))[1] == {
        'local': ([A, 'amqps://x@h:5671'], 'cluster'), 'dc2': ([B, C], 'cluster')}


def test_a_dict_names_zones_and_their_shape():
    primary, got = zones({'dc1': [A, B], 'dc2': {'urls': C, 'shape': 'standalone'}},
                         zone='dc2', shape='cluster')
    assert primary == 'dc2'
    assert got == {'dc1': ([A, B], 'cluster'), 'dc2': ([C], 'standalone')}
    assert zones({'dc1': [A]}, shape='standalone')[1]['dc1'][1] == 'standalone'
    # Without zone=, the primary zone is "local" if there is one, else the first.
    assert zones({'x': A, 'local': B})[0] == 'local'
    assert zones({'x': A, 'y': B})[0] == 'x'


@pytest.mark.parametrize('brokers, kwargs, message', [
    ([], {}, 'no broker URL'),
    ('zone=dc2', {}, 'no broker URL'),
    ({'dc1': []}, {}, 'no broker URL'),
    ([A], {'zone': 'dc9'}, 'primary zone'),
    ({'dc1': {'urls': A, 'shape': 'ring'}}, {}, 'shape'),
    ({'dc1': {'url': A}}, {}, 'unknown keys'),
    ({'dc1': 'zone=dc2;' + A}, {}, 'another zone'),
    (['not a url'], {}, 'not a broker URL'),
    (['zone=;' + A], {}, 'bad zone name'),
    ([A, 5], {}, 'must be text'),
])
def test_bad_topologies_are_refused_with_a_reason(brokers, kwargs, message):
    with pytest.raises(ValueError, match=message):
        parse_topology(brokers, **kwargs)


def test_the_runtime_builds_one_publishing_link_per_zone_and_consumers_per_shape():
    kz = Kazoo({'local': {'urls': [A, B], 'shape': 'standalone'}, 'dc2': [C]})
    assert list(kz.zones) == ['local', 'dc2']
    local, dc2 = kz.zones['local'], kz.zones['dc2']
    assert local.pub_link.urls == [A, B] and [f.link.urls for f in local.feeds] == [[A], [B]]
    assert dc2.pub_link.urls == [C] and [f.link.urls for f in dc2.feeds] == [[C]]
    assert {link.zone for link in local.links} == {'local'}
    assert kz._pub_link is local.pub_link and kz.urls == [A, B]
    with pytest.raises(ValueError, match='unknown zone'):
        kz.publish('x', 'y', {}, zone='dc9')


def test_subscriptions_are_copied_to_the_links_they_are_consumed_on():
    kz = Kazoo({'local': {'urls': [A, B], 'shape': 'standalone'}, 'dc2': [C]})
    plain = kz.subscribe('ex', 'k')
    fed = kz.subscribe('ex', 'f', federate=True)
    assert [s.zone for s in plain.copies] == ['local', 'local']
    assert [s.zone for s in fed.copies] == ['local', 'local', 'dc2']
    # One name and tag per subscription, whichever broker it is declared on.
    assert {s.queue_name('n', s.index) for s in fed.copies} == {fed.queue_name('n', 1)}
    assert {s.tag for s in fed.copies} == {'kg-2'}
    assert [len(f.subscriber.subscriptions) for f in kz.zones['dc2'].feeds] == [1]


def test_tls_options_reach_every_link_of_every_zone():
    kz = Kazoo({'local': {'urls': [A, B], 'shape': 'standalone'}, 'dc2': [C]},
               ssl={'ca_certs': '/etc/ssl/certs/ca-certificates.crt'})
    links = [link for z in kz.zones.values() for link in z.links]
    assert len(links) == 5
    assert all(link.brokers.ssl['ca_certs'] == '/etc/ssl/certs/ca-certificates.crt'
               for link in links)
