"""kazoo_green.pua: Kazoo presence payloads made into what pua_json reads (with a fake KSR;
tests/e2e/test_kazoo_node.py runs them through the real pua_json and presence modules)."""

import pytest

from kazoo_green import InvalidPayload, KazooError, pua
from kazoo_green.testing import fake_ksr


@pytest.fixture
def fake():
    with fake_ksr() as fake:
        yield fake


def dialog(**fields):
    payload = {'Event-Category': 'presence', 'Event-Name': 'dialog_update',
               'From': 'sip:bob@example.com', 'To': 'sip:alice@example.com',
               'State': 'confirmed', 'Call-ID': 'c1', 'Direction': 'initiator'}
    payload.update(fields)
    return payload


def test_a_kazoo_dialog_update_becomes_a_pua_json_dialog_update(fake):
    assert pua.dialoginfo(dialog()) == 1
    [sent] = fake.pua_published
    assert (sent['Event-Name'], sent['Event-Package']) == ('update', 'dialog')
    assert (sent['From-User'], sent['From-Realm'], sent['To-User']) == ('bob', 'example.com',
                                                                        'alice')
    assert sent['Expires'] == pua.DEFAULT_EXPIRES and sent['State'] == 'confirmed'
    assert sent['Call-ID'] == 'c1' and sent['Direction'] == 'initiator'


def test_publish_chooses_the_package_from_kazoos_event_name(fake):
    pua.publish(dialog())
    pua.publish({'Event-Name': 'mwi_update', 'From': '<sip:carol@example.com>',
                 'Messages-New': 2, 'Messages-Saved': 1})
    pua.publish({'Event-Name': 'update', 'From': 'sip:dave@example.com', 'State': 'online'})
    assert [p['Event-Package'] for p in fake.pua_published] == ['dialog', 'message-summary',
                                                                'presence']


def test_an_mwi_update_gets_what_pua_json_needs(fake):
    pua.mwi({'Event-Name': 'mwi_update', 'To': 'sip:carol@example.com', 'Messages-New': '2',
             'Messages-Saved': 1, 'Expires': 60})
    [sent] = fake.pua_published
    assert (sent['From-User'], sent['From-Realm']) == ('carol', 'example.com')
    assert sent['Messages-Waiting'] == 'yes' and sent['Expires'] == 60
    assert (sent['Messages-Urgent'], sent['Messages-Urgent-Saved']) == (0, 0)
    assert sent['Message-Account'] == 'sip:carol@example.com'
    # One presentity per mailbox: the next update replaces it.
    assert sent['Call-ID'] == 'kazoo-mwi-carol@example.com'
    pua.mwi({'Username': 'carol', 'Realm': 'example.com', 'Messages-New': 0})
    assert fake.pua_published[-1]['Messages-Waiting'] == 'no'


@pytest.mark.parametrize('payload, why', [
    (dialog(State=None), 'needs State'),
    (dialog(**{'Call-ID': ''}), 'needs Call-ID'),
    (dialog(From='nobody'), 'no presentity'),
    (dialog(Expires=0), 'Expires must be positive'),
    (dialog(Expires='soon'), 'Expires must be an integer'),
    (dialog(State={'x': 1}), 'State must be text'),
    (['not', 'an', 'object'], 'JSON object'),
])
def test_what_pua_json_would_drop_silently_is_refused(fake, payload, why):
    with pytest.raises(InvalidPayload, match=why):
        pua.dialoginfo(payload)
    assert fake.pua_published == []


def test_an_unknown_event_is_refused(fake):
    with pytest.raises(InvalidPayload, match='which presence event'):
        pua.publish({'Event-Name': 'who_knows', 'From': 'sip:a@b'})


def test_pua_jsons_refusal_is_an_error(fake):
    fake.results['pua_json.publish'] = -1
    with pytest.raises(KazooError, match='pua_json could not read'):
        pua.presence({'From': 'sip:dave@example.com', 'State': 'online'})
