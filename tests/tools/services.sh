#!/usr/bin/env bash
# Install and start what the test suite needs and the machine does not provide:
# Kamailio with app_python3 and the C kazoo module (tests/e2e/test_c_module_interop.py
# runs it), sipp (Debian packages), RabbitMQ on 127.0.0.1:5672 (started here only if it
# is not running).
#   --bench  also the C rabbitmq module bench/compare.py measures against
#            (kamailio-rabbitmq-modules)
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
if [ -n "$bench" ]; then
    [ -f "$mods/rabbitmq.so" ] || mod_need+=(kamailio-rabbitmq-modules)
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
