#!/usr/bin/env bash
# Start what the test suite needs and is not started by the machine:
# RabbitMQ on 127.0.0.1:5672 (started here only if it is not running).
set -euo pipefail

rabbit_up() { rabbitmqctl -q status >/dev/null 2>&1; }

if ! command -v rabbitmq-server >/dev/null 2>&1; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server
fi
if ! rabbit_up; then
    echo "services.sh: starting RabbitMQ" >&2
    rabbitmq-server -detached
    for _ in $(seq 60); do rabbit_up && break; sleep 1; done
fi
rabbitmqctl -q await_startup
echo "services.sh: RabbitMQ is up" >&2
