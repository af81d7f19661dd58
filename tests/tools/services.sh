#!/usr/bin/env bash
# Install and start what the test suite needs and the machine does not provide:
# Kamailio with app_python3 and the C kazoo module (tests/e2e/test_c_module_interop.py
# runs it), the modules of the Kazoo node example, sipp (Debian packages), RabbitMQ on 127.0.0.1:5672 (started here only if it
# is not running).
#   --bench  also what bench/compare.py's other systems need: the C rabbitmq module
#            (kamailio-rabbitmq-modules), db_postgres (kamailio-postgres-modules) and a
#            PostgreSQL on 127.0.0.1:5432 (started if it is not running), and
#            http_async_client (not packaged by Debian: built from Debian's own source by
#            tests/tools/build_http_async_client.sh), and perf (linux-perf) for
#            bench/cpu_split.py
set -euo pipefail

bench=
[ "${1:-}" = --bench ] && bench=1

apt_updated=
apt_install() {
    [ -n "$apt_updated" ] || { apt-get update -q; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

need=()
command -v kamailio >/dev/null 2>&1 || need+=(kamailio)
[ -f /usr/lib/x86_64-linux-gnu/kamailio/modules/app_python3.so ] \
    || ls /usr/lib/*/kamailio/modules/app_python3.so >/dev/null 2>&1 \
    || need+=(kamailio-python3-modules)
command -v sipp >/dev/null 2>&1 || need+=(sip-tester)
if [ ${#need[@]} -gt 0 ]; then
    echo "services.sh: installing ${need[*]}" >&2
    apt_install kamailio kamailio-python3-modules sip-tester
fi
mods=$(dirname "$(ls /usr/lib/*/kamailio/modules/tm.so | head -1)")
mod_need=()
[ -f "$mods/kazoo.so" ] || mod_need+=(kamailio-kazoo-modules)
# The Kazoo node example (examples/kazoo-node): presence, pua_json (+ json), db_sqlite
# (+ Kamailio's SQLite schema files) and sqlite3.
[ -f "$mods/presence_dialoginfo.so" ] || mod_need+=(kamailio-presence-modules)
[ -f "$mods/pua_json.so" ] || mod_need+=(kamailio-json-modules)
[ -f "$mods/db_sqlite.so" ] || mod_need+=(kamailio-sqlite-modules)
command -v sqlite3 >/dev/null 2>&1 || mod_need+=(sqlite3)
if [ -n "$bench" ]; then
    [ -f "$mods/rabbitmq.so" ] || mod_need+=(kamailio-rabbitmq-modules)
    [ -f "$mods/db_postgres.so" ] || mod_need+=(kamailio-postgres-modules)
    command -v perf >/dev/null 2>&1 || mod_need+=(linux-perf)   # bench/cpu_split.py
fi
if [ ${#mod_need[@]} -gt 0 ]; then
    echo "services.sh: installing ${mod_need[*]}" >&2
    apt_install "${mod_need[@]}"
fi

rabbit_up() { rabbitmqctl -q status >/dev/null 2>&1; }

command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
if ! rabbit_up; then
    echo "services.sh: starting RabbitMQ" >&2
    rabbitmq-server -detached
    for _ in $(seq 60); do rabbit_up && break; sleep 1; done
fi
rabbitmqctl -q await_startup
echo "services.sh: RabbitMQ is up" >&2

if [ -n "$bench" ]; then
    bash "$(dirname "$0")/build_http_async_client.sh"
    pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
    command -v pg_isready >/dev/null 2>&1 || apt_install postgresql
    if ! pg_up; then
        echo "services.sh: starting PostgreSQL" >&2
        [ -d /etc/postgresql ] || apt_install postgresql
        pg_ctlcluster "$(ls /etc/postgresql | sort -V | tail -1)" main start
        for _ in $(seq 30); do pg_up && break; sleep 1; done
    fi
    pg_up
    echo "services.sh: PostgreSQL is up" >&2
fi
