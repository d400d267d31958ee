#!/usr/bin/env bash
# make broker: RabbitMQ with rabbitmq_stomp on $BROKER_PORT. Does nothing if STOMP already answers.
# Docker compose where a Docker engine answers, otherwise a local rabbitmq-server (installed
# from Debian's packages when missing).
set -euo pipefail
port="${BROKER_PORT:-61613}"
host="${BROKER_HOST:-localhost}"

answers() { timeout 1 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; }
wait_for_port() {
  for _ in $(seq 1 90); do answers && return 0; sleep 1; done
  echo "RabbitMQ's STOMP port $port did not open" >&2; return 1
}

if answers; then echo "broker: STOMP answers on $host:$port"; exit 0; fi

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  echo "broker: starting RabbitMQ with docker compose"
  BROKER_PORT="$port" docker compose -f docker-compose.rabbitmq.yml up -d
  wait_for_port; echo "broker: ready on $host:$port"; exit 0
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "broker: installing rabbitmq-server from Debian's packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
if rabbitmqctl -q status >/dev/null 2>&1; then
  echo "broker: RabbitMQ runs without STOMP; enabling rabbitmq_stomp"
  rabbitmq-plugins -q enable rabbitmq_stomp
else
  echo "broker: starting a local rabbitmq-server with rabbitmq_stomp"
  rabbitmq-plugins -q enable --offline rabbitmq_stomp
  rabbitmq-server -detached
fi
wait_for_port
echo "broker: ready on $host:$port"
