"""What Kazoo(ssl=...) accepts and what each broker connection gets (kazoo_green._tls)."""

import kazoo_green  # noqa: F401

import ssl

import pytest

from kazoo_green import Kazoo
from kazoo_green._tls import for_broker, normalise


def test_no_option_means_tls_only_for_amqps_urls_with_verification():
    assert normalise(None) is None and normalise(False) is None
    assert for_broker(None, 'amqp://u:p@rabbit1:5672//') is False
    assert for_broker(None, 'amqps://u:p@rabbit1.example.com:5671//') == {
        'server_hostname': 'rabbit1.example.com'}   # CERT_REQUIRED is py-amqp's default


def test_true_or_a_dict_means_tls_for_every_broker():
    assert for_broker(normalise(True), 'amqp://u:p@10.0.0.1:5671//') == {
        'server_hostname': '10.0.0.1'}
    opts = normalise({'ca_certs': '/etc/ca.pem', 'certfile': 'c.pem', 'keyfile': 'k.pem'})
    assert for_broker(opts, 'amqps://h2:5671//') == {
        'ca_certs': '/etc/ca.pem', 'certfile': 'c.pem', 'keyfile': 'k.pem',
        'server_hostname': 'h2'}


def test_host_name_is_the_url_of_each_attempt_unless_given():
    opts = normalise({'ca_certs': 'ca.pem', 'server_hostname': None})
    assert for_broker(opts, 'amqps://a.example//')['server_hostname'] == 'a.example'
    assert for_broker(opts, 'amqps://b.example//')['server_hostname'] == 'b.example'
    assert opts == {'ca_certs': 'ca.pem', 'server_hostname': None}   # never changed
    fixed = normalise({'server_hostname': 'rabbit.example'})
    assert for_broker(fixed, 'amqps://10.0.0.2//')['server_hostname'] == 'rabbit.example'


def test_host_name_check_off_or_no_verification_sends_no_server_hostname():
    # py-amqp checks the host name exactly when server_hostname is given
    assert for_broker(normalise({'check_hostname': False}), 'amqps://h//') == {}
    off = normalise({'cert_reqs': ssl.CERT_NONE, 'server_hostname': 'h'})
    assert for_broker(off, 'amqps://h//') == {'cert_reqs': ssl.CERT_NONE}


def test_what_py_amqp_cannot_take_fails_at_once():
    with pytest.raises(TypeError, match='SSLContext'):
        normalise(ssl.create_default_context())
    with pytest.raises(ValueError, match='ca_cert'):
        normalise({'ca_cert': 'typo.pem'})   # would otherwise skip the CA silently
    with pytest.raises(TypeError):
        normalise('yes')
    with pytest.raises(ValueError):
        Kazoo('amqps://h//', ssl={'verify': True})
