#!/usr/bin/env bash
# make broker: RabbitMQ with rabbitmq_stomp on $BROKER_PORT and the management plugin (its HTTP
# API on 15672 gives the dashboard queue depths and rates). Starts nothing if STOMP already answers.
# Docker compose where a Docker engine answers, otherwise a local rabbitmq-server (installed
# from Debian's packages when missing). Then, in every case, provisions the deployment's
# least-privilege logins, policies and queues (src/messaging/accounts.py) where rabbitmqctl
# reaches the broker.
set -euo pipefail
port="${BROKER_PORT:-61613}"
host="${BROKER_HOST:-localhost}"

answers() { timeout 1 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; }
wait_for_port() {
  for _ in $(seq 1 90); do answers && return 0; sleep 1; done
  echo "RabbitMQ's STOMP port $port did not open" >&2; return 1
}

ctl="rabbitmqctl"
provision() {
  if [ ! -x .venv/bin/python ]; then echo "broker: no .venv yet (make install); logins not provisioned"; return 0; fi
  if ! $ctl -q status >/dev/null 2>&1; then
    echo "broker: rabbitmqctl cannot reach it; provision logins where it runs (python -m src.messaging.accounts)"
    return 0
  fi
  # WORKER_LOGIN=<host>: also a worker login of that host's own (replicas vote once per login)
  .venv/bin/python -m src.messaging.accounts --ctl "$ctl" --worker-login "${WORKER_LOGIN:-}"
}

if docker compose -f docker-compose.rabbitmq.yml ps -q rabbitmq 2>/dev/null | grep -q .; then
  ctl="docker compose -f docker-compose.rabbitmq.yml exec -T rabbitmq rabbitmqctl"
fi
management() {  # idempotent; a broker in the compose container has it already
  if [ "$ctl" = rabbitmqctl ] && command -v rabbitmq-plugins >/dev/null 2>&1 && rabbitmqctl -q status >/dev/null 2>&1; then
    rabbitmq-plugins -q enable rabbitmq_management >/dev/null
  fi
}
if answers; then echo "broker: STOMP answers on $host:$port"; management; provision; exit 0; fi

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  echo "broker: starting RabbitMQ with docker compose"
  BROKER_PORT="$port" docker compose -f docker-compose.rabbitmq.yml up -d
  wait_for_port; echo "broker: ready on $host:$port"
  ctl="docker compose -f docker-compose.rabbitmq.yml exec -T rabbitmq rabbitmqctl"; provision; exit 0
fi

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "broker: installing rabbitmq-server from Debian's packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
if rabbitmqctl -q status >/dev/null 2>&1; then
  echo "broker: RabbitMQ runs without STOMP; enabling rabbitmq_stomp and rabbitmq_management"
  rabbitmq-plugins -q enable rabbitmq_stomp rabbitmq_management
else
  echo "broker: starting a local rabbitmq-server with rabbitmq_stomp and rabbitmq_management"
  rabbitmq-plugins -q enable --offline rabbitmq_stomp rabbitmq_management
  rabbitmq-server -detached
fi
wait_for_port
echo "broker: ready on $host:$port"
provision
