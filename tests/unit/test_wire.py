"""Routing-key escaping, JSON paths, payload decoding and route names (no broker)."""

import collections
import decimal

import pytest
import simplejson

from kazoo_green import BadMessage, InvalidPayload, encode, json_path
from kazoo_green.wire import dumps, loads_payload, route_names, stamp, to_payload


@pytest.mark.parametrize('text, expected', [
    ('alice', 'alice'),
    ('Az09-~_', 'Az09-~_'),
    ('sip.example.com', 'sip%2Eexample%2Ecom'),
    ('alice smith', 'alice+smith'),
    ('a@b:c/d', 'a%40b%3Ac%2Fd'),
    ('100%', '100%25'),
    ('+', '%2B'),
    ('*.#', '%2A%2E%23'),
    ('é', '%C3%A9'),
    ('', ''),
    (1234, '1234'),
    (b'x.y', 'x%2Ey'),
])
def test_encode(text, expected):
    assert encode(text) == expected


PAYLOAD = {
    'Channels': [{'switch_url': 'sip:fs1@10.0.0.1', 'legs': [1, 2, 3]}, {'switch_url': 'sip:fs2'}],
    'Call-ID': 'abc',
    'Nested': {'a': {'b': None, 'c': 0}},
}


@pytest.mark.parametrize('path, expected', [
    ('Call-ID', 'abc'),
    ('Channels[0].switch_url', 'sip:fs1@10.0.0.1'),
    ('Channels[1].switch_url', 'sip:fs2'),
    ('Channels[-1].switch_url', 'sip:fs2'),
    ('Channels[0].legs[2]', 3),
    ('Channels[0].legs', [1, 2, 3]),
    ('Nested.a.c', 0),
    ('Nested.a.b', None),
    ('Channels[5].switch_url', None),
    ('Missing', None),
    ('Call-ID.deeper', None),
    ('Nested[0]', None),
])
def test_json_path(path, expected):
    assert json_path(PAYLOAD, path) == expected


def test_json_path_accepts_json_text_and_default():
    assert json_path('{"a": [{"b": "c"}]}', 'a[0].b') == 'c'
    assert json_path({'a': 1}, 'b', default='x') == 'x'


def test_json_path_rejects_malformed_path():
    with pytest.raises(ValueError):
        json_path(PAYLOAD, 'Channels[x].a')


@pytest.mark.parametrize('body, reason', [
    (b'', 'empty body'),
    (None, 'empty body'),
    (b'not json', 'not JSON'),
    (b'{"a": ', 'not JSON'),
    (b'[1, 2]', 'JSON is not an object'),
    (b'"text"', 'JSON is not an object'),
    (b'\xff\xfe{}', 'invalid UTF-8'),
    (b'{"a": 1} trailing', 'not JSON'),
    (b'{"a": 1}{"b": 2}', 'not JSON'),
    (b'{"a": 1', 'not JSON'),
    (b'{"a": NaN}', 'not JSON'),
])
def test_loads_payload_bad_input(body, reason):
    with pytest.raises(BadMessage) as info:
        loads_payload(body)
    assert info.value.reason == reason


def test_loads_payload_good():
    assert loads_payload(b'{"a": "\xc3\xa9"}') == {'a': 'é'}
    assert loads_payload('{"a": 1}') == {'a': 1}
    # whitespace around the object, either side (two parsing paths)
    assert loads_payload(b'  {"a": [1, {"b": null}]}\r\n') == {'a': [1, {'b': None}]}
    assert loads_payload(b'{"a": true}  \n') == {'a': True}
    # integers beyond 64 bits stay exact
    assert loads_payload(b'{"n": 123456789012345678901234567890}')['n'] == \
        123456789012345678901234567890


@pytest.mark.parametrize('payload', [
    {'Event-Category': 'route', 'To': 'é', 'n': [1, 2.5, None, True, {'x': '"\\\n'}]},
    {'big': 2 ** 70},                      # beyond orjson: simplejson writes it
    {1: 'int key', None: 'null key'},      # non-string keys, as simplejson writes them
    {'d': decimal.Decimal('1.10')},
    collections.OrderedDict([('b', 1), ('a', 2)]),
])
def test_dumps_writes_what_simplejson_reads_back(payload):
    body = dumps(payload)
    assert isinstance(body, bytes)
    assert loads_payload(body) == simplejson.loads(simplejson.dumps(payload))
    assert b' ' not in body.replace(b'int key', b'').replace(b'null key', b'')


def test_dumps_is_compact_utf8_in_key_order():
    assert dumps({'b': 'é', 'a': [1, None]}) == '{"b":"é","a":[1,null]}'.encode('utf-8')


@pytest.mark.parametrize('payload', ['{bad', '[1]', '3', 42, None, b'\xff'])
def test_to_payload_rejects(payload):
    with pytest.raises(InvalidPayload):
        to_payload(payload)


def test_to_payload_copies_dicts():
    original = {'a': 1}
    copy = to_payload(original)
    copy['b'] = 2
    assert original == {'a': 1}
    assert to_payload('{"a": 1}') == {'a': 1}


def test_stamp_adds_only_missing_fields_to_a_copy():
    original = {'App-Name': 'mine'}
    stamped = stamp(original, 'kamailio', '5.6', 'kamailio@host')
    assert original == {'App-Name': 'mine'}
    assert stamped['App-Name'] == 'mine'
    assert stamped['App-Version'] == '5.6'
    assert stamped['Node'] == 'kamailio@host'
    assert len(stamped['Msg-ID']) == 36
    assert stamp({'Msg-ID': 'x'}, 'a', 'b', 'c')['Msg-ID'] == 'x'
    assert stamp('{"Msg-ID": "y"}', 'a', 'b', 'c')['Msg-ID'] == 'y'
    with pytest.raises(InvalidPayload):
        stamp('[1]', 'a', 'b', 'c')
    # A Msg-ID given replaces the payload's, and none is made (an async query's).
    assert stamp({'Msg-ID': 'x'}, 'a', 'b', 'c', 'mine')['Msg-ID'] == 'mine'
    assert stamp({}, 'a', 'b', 'c', '')['Msg-ID'] == ''


def test_route_names_follow_the_c_module_order():
    names = route_names({'Event-Category': 'Directory', 'Event-Name': 'REG_FLUSH'})
    assert names == (
        'kazoo:consumer-event-directory-reg-flush',
        'kazoo:consumer-event-directory',
        'kazoo:consumer-event-event-category-event-name',
        'kazoo:consumer-event-event-category',
        'kazoo:consumer-event',
    )


def test_route_names_with_binding_keys():
    payload = {'Event-Category': 'x', 'Event-Name': 'y', 'Type': 'dialog_info',
               'Sub_Type': 'Update'}
    assert route_names(payload, 'Type', 'Sub_Type') == (
        'kazoo:consumer-event-dialog-info-update',
        'kazoo:consumer-event-dialog-info',
        'kazoo:consumer-event-type-sub-type',
        'kazoo:consumer-event-type',
        'kazoo:consumer-event',
    )


FALLBACK = ('kazoo:consumer-event-event-category-event-name',
            'kazoo:consumer-event-event-category', 'kazoo:consumer-event')


@pytest.mark.parametrize('payload, first_two', [
    ({}, ('kazoo:consumer-event--', 'kazoo:consumer-event-')),
    ({'Event-Name': 'b'}, ('kazoo:consumer-event--b', 'kazoo:consumer-event-')),
    ({'Event-Category': None, 'Event-Name': 'b'},
     ('kazoo:consumer-event--b', 'kazoo:consumer-event-')),
    ({'Event-Category': '', 'Event-Name': 'b'},
     ('kazoo:consumer-event--b', 'kazoo:consumer-event-')),
    ({'Event-Category': 'a'}, ('kazoo:consumer-event-a-', 'kazoo:consumer-event-a')),
    ({'Event-Category': 'a', 'Event-Name': None},
     ('kazoo:consumer-event-a-', 'kazoo:consumer-event-a')),
])
def test_missing_key_fields_give_empty_values_as_in_the_c_module(payload, first_two):
    # kz_amqp_consumer_event_cfg: an empty value, no error; with no route of those
    # names the message falls through to step 3 (KAZOO-WIRE.md: {"t":3} ran step 3,
    # {"Event-Category":"cat"} ran kazoo:consumer-event-cat).
    assert route_names(payload) == first_two + FALLBACK


def test_a_subscriptions_own_key_field_stands_for_its_missing_value():
    assert route_names({'Sub_Type': 'Update'}, 'Type', 'Sub_Type') == (
        'kazoo:consumer-event-type-update', 'kazoo:consumer-event-type',
        'kazoo:consumer-event-type-sub-type', 'kazoo:consumer-event-type',
        'kazoo:consumer-event')
    assert route_names({'Type': 'x'}, 'Type', 'Sub_Type')[0] == 'kazoo:consumer-event-x-sub-type'


def test_route_names_scalar_values():
    assert route_names({'Event-Category': 7, 'Event-Name': True})[0] == \
        'kazoo:consumer-event-7-true'


def test_msg_ids_are_random_version_4_uuids():
    import uuid
    from kazoo_green.wire import new_msg_id
    ids = [new_msg_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
    # every random hex digit takes every value somewhere (not a constant part)
    for position in (0, 7, 9, 15, 20, 35):
        assert len({text[position] for text in ids}) == 16


def test_tokens_are_16_random_hex_digits():
    from kazoo_green.wire import new_token
    tokens = [new_token() for _ in range(2000)]
    assert len(set(tokens)) == len(tokens)
    assert all(len(t) == 16 and int(t, 16) >= 0 for t in tokens)
    for position in (0, 7, 15):
        assert len({t[position] for t in tokens}) == 16


def test_json_path_escape_stands_for_a_dot_inside_a_key():
    # The C module's json_escape_char ('%'): Media-Servers are keyed by host names.
    payload = {'Media-Servers': {'fs1.example.com': {'Interfaces': {'sip': {'info': {
        'url': 'sip:10.0.0.1:5060'}}}}}, 'a.b': 1, 'a': {'b': 2}}
    assert json_path(payload, 'Media-Servers.fs1%example%com.Interfaces.sip.info.url') == \
        'sip:10.0.0.1:5060'
    assert json_path(payload, 'a%b') == 1
    assert json_path(payload, 'a.b') == 2
    assert json_path(payload, 'a#b', escape='#') == 1
    assert json_path({'a%b': 3}, 'a%b', escape=None) == 3
    assert json_path({'a': None}, 'a', default='d') == 'd'   # null counts as missing


def test_the_runtimes_key_fields_replace_the_defaults_without_the_fallback():
    # amqp_consumer_event_key/_subkey: a missing value stays empty (no field-name fallback).
    assert route_names({'Type': 'a'}, defaults=('Type', 'Sub')) == (
        'kazoo:consumer-event-a-', 'kazoo:consumer-event-a', 'kazoo:consumer-event-type-sub',
        'kazoo:consumer-event-type', 'kazoo:consumer-event')


def test_values_that_are_not_plain_text_as_the_c_module_reads_them():
    # json_object_get_string: objects and lists as json-c's spaced text, text up to a
    # NUL; tolower on A-Z only (tests/e2e/test_c_module_interop.py compares with it).
    assert route_names({'Event-Category': {'x': 1, 'y': [1, {}]}, 'Event-Name': 'b/c'})[:2] == (
        'kazoo:consumer-event-{ "x": 1, "y": [ 1, { } ] }-b/c',
        'kazoo:consumer-event-{ "x": 1, "y": [ 1, { } ] }')
    assert route_names({'Event-Category': ['a/b'], 'Event-Name': []})[0] == \
        'kazoo:consumer-event-[ "a\\/b" ]-[ ]'
    assert route_names({'Event-Category': 'cat\x00zzz', 'Event-Name': 'NAME'})[0] == \
        'kazoo:consumer-event-cat-name'
    assert route_names({'Event-Category': '\u212aelvin'})[1] == 'kazoo:consumer-event-\u212aelvin'
    # a subscription's own key holding an object: its text, no fallback to the key's name
    assert route_names({'Kind': {'x': 1}, 'Sub': 'ping'}, 'Kind', 'Sub')[0] == \
        'kazoo:consumer-event-{ "x": 1 }-ping'
