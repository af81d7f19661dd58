#!/usr/bin/env bash
# Make the project virtualenv from the given base Python and install the
# package with its test dependencies.
#   venv.sh [BASE_PYTHON [VENV [CONSTRAINTS]]]
# With CONSTRAINTS (a pip constraints file, e.g. requirements-lowest.txt) every
# package is installed at the version that file pins.
set -euo pipefail
base=${1:-/usr/bin/python3}
venv=${2:-.venv}
constraints=()
[ -n "${3:-}" ] && constraints=(-c "$3")
if ! "$base" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "venv.sh: $base has no venv module; installing python3-venv" >&2
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi
[ -x "$venv/bin/python" ] || "$base" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "${constraints[@]}" -r requirements-test.txt -e .
