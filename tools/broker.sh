#!/usr/bin/env bash
# make broker: RabbitMQ with rabbitmq_stomp on $BROKER_PORT and the management plugin (its HTTP
# API on 15672 gives the dashboard queue depths and rates). Starts nothing if STOMP already answers.
# Docker compose where a Docker engine, a compose command and the rabbitmq image are here,
# otherwise a local rabbitmq-server (installed from Debian's packages when missing), saying why.
# Then, in every case, provisions the deployment's least-privilege logins, policies and queues
# (src/messaging/accounts.py) where rabbitmqctl reaches the broker.
set -euo pipefail
if [ -n "${BROKER_HOSTS:-}" ]; then
  # a single node on BROKER_PORT would be provisioned, then the declaring connection to the
  # listed nodes refused (a bare ConnectFailedException)
  echo "broker: BROKER_HOSTS is set ($BROKER_HOSTS): that is a cluster; \`make broker-cluster\` starts and" \
    "provisions this host's three nodes (unset BROKER_HOSTS for make broker's single node)" >&2
  exit 2
fi
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

# Docker compose only where a Docker engine, a compose command and the broker's image are all
# here: Debian's docker.io has no `docker compose` (its docker-compose is the v1 command), and
# with no registry rabbitmq:3.13-management cannot be pulled. Otherwise the local rabbitmq-server.
compose_image=rabbitmq:3.13-management
compose=""
if docker compose version >/dev/null 2>&1; then compose="docker compose -f docker-compose.rabbitmq.yml"
elif command -v docker-compose >/dev/null 2>&1; then compose="docker-compose -f docker-compose.rabbitmq.yml"
fi
no_compose() {  # why compose cannot start the broker here; nothing when it can
  if ! command -v docker >/dev/null 2>&1; then echo "docker is not installed"
  elif ! docker info >/dev/null 2>&1; then echo "no Docker engine answers (docker info failed)"
  elif [ -z "$compose" ]; then echo "neither \`docker compose\` nor \`docker-compose\` is installed"
  elif ! docker image inspect "$compose_image" >/dev/null 2>&1 \
       && ! timeout 300 docker pull -q "$compose_image" >/dev/null 2>&1; then
    echo "the image $compose_image is not here and cannot be pulled"
  fi
}
if [ -n "$compose" ] && $compose ps -q rabbitmq 2>/dev/null | grep -q .; then
  ctl="$compose exec -T rabbitmq rabbitmqctl"
fi
management() {  # idempotent; a broker in the compose container has it already
  if [ "$ctl" = rabbitmqctl ] && command -v rabbitmq-plugins >/dev/null 2>&1 && rabbitmqctl -q status >/dev/null 2>&1; then
    rabbitmq-plugins -q enable rabbitmq_management >/dev/null
  fi
}
if answers; then echo "broker: STOMP answers on $host:$port"; management; provision; exit 0; fi

reason="$(no_compose)"
if [ -z "$reason" ]; then
  echo "broker: starting RabbitMQ with ${compose%% -f*}"
  BROKER_PORT="$port" $compose up -d
  wait_for_port; echo "broker: ready on $host:$port"
  ctl="$compose exec -T rabbitmq rabbitmqctl"; provision; exit 0
fi
echo "broker: not with docker compose: $reason; a local rabbitmq-server instead"

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
