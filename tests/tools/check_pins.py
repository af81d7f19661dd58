"""Check that a virtualenv holds exactly the versions a pip constraints file pins.

    VENV/bin/python tests/tools/check_pins.py requirements-lowest.txt

Run with the venv's own Python. Fails (exit 1) if an installed distribution is not
pinned in the file, or is installed at another version than its pin: so a run
"at the lowest versions" cannot quietly test something newer. Pins of packages
that are not installed are fine (e.g. test tools that no requirements file asks
for yet). pip, setuptools and wheel (the venv's own tools) and the project itself
are not checked.
"""

import re
import sys
from importlib import metadata

IGNORED = {'pip', 'setuptools', 'wheel', 'kazoo-green'}


def canonical(name):
    return re.sub(r'[-_.]+', '-', name).lower()


def read_pins(path):
    pins = {}
    with open(path) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if not line:
                continue
            m = re.fullmatch(r'([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)', line)
            if not m:
                sys.exit('check_pins: %s: not a NAME==VERSION pin: %r' % (path, line))
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def main(path):
    pins = read_pins(path)
    installed = {}
    for dist in metadata.distributions():
        installed[canonical(dist.metadata['Name'])] = dist.version
    bad = []
    for name, version in sorted(installed.items()):
        if name in IGNORED:
            continue
        pin = pins.get(name)
        if pin is None:
            bad.append('%s %s is installed but not pinned' % (name, version))
        elif version != pin:
            bad.append('%s %s is installed, the pin is %s' % (name, version, pin))
        else:
            print('check_pins: %-16s %s' % (name, version))
    for line in bad:
        print('check_pins: FAIL: ' + line, file=sys.stderr)
    if bad:
        sys.exit(1)
    print('check_pins: all %d installed packages are at their pins in %s'
          % (len([n for n in installed if n not in IGNORED]), path))


if __name__ == '__main__':
    main(sys.argv[1] if len(sys.argv) > 1 else 'requirements-lowest.txt')
