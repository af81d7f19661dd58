"""encode() against kazoo_encode itself: a table produced by Debian's C kazoo module
(tests/tools/kazoo_encode_table.py ran it in a real Kamailio; see the table's header)."""

import json
import os
import re

import pytest

from kazoo_green import encode

TABLE = os.path.join(os.path.dirname(__file__), '..', 'data', 'kazoo_encode_table.json')

with open(TABLE) as f:
    _DATA = json.load(f)
ENTRIES = _DATA['entries']


def _c_garbled(escape):
    """The C module's escape of a byte >= 0x80 (signed char): '%' + chr(0x20 + high
    nibble) + the low nibble's hex digit, from ours, '%' + two hex digits."""
    byte = int(escape[1:], 16)
    return '%' + chr(0x20 + (byte >> 4)) + '%X' % (byte & 0xf)


def test_the_table_comes_from_the_c_module_and_covers_the_edges():
    assert 'kamailio 5.6' in _DATA['kamailio_version']
    inputs = {bytes.fromhex(e['input_hex']) for e in ENTRIES}
    assert {b'#', b'*', b'##', b'a#b', b'', b'a' * 255, b'a' * 256, b'.' * 85} <= inputs
    assert all(bytes([b]) in inputs for b in range(1, 256))
    assert any(e['rc'] == -1 for e in ENTRIES)


@pytest.mark.parametrize('entry', ENTRIES, ids=lambda e: e['input_hex'][:24] or 'empty')
def test_encode_matches_kazoo_encode(entry):
    value = bytes.fromhex(entry['input_hex'])
    if entry['rc'] == -1:   # the C module refuses it (and leaves the target unset)
        with pytest.raises(ValueError):
            encode(value)
        return
    want = bytes.fromhex(entry['output_hex']).decode('latin-1')
    got = encode(value)
    if all(b < 0x80 for b in value):
        assert got == want
    else:
        # Not copied on purpose: bytes >= 0x80 are '%XX' here. Apart from those escapes
        # the text is the C module's, cut at the same place.
        garbled = re.sub(r'%[89A-F][0-9A-F]', lambda m: _c_garbled(m.group(0)), got)
        assert garbled == want
