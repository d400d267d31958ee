#!/usr/bin/env bash
# make stack: the compose stack (docker-compose.yml): broker, server on SERVER_PORT (5000), and
# WORKERS_HEALTHY (2) separation workers plus one video worker, from `make images`' images
# (built first when missing). `docker compose down` (or `docker-compose down`) stops it.
# The broker is the official rabbitmq:3.13-management image when it is here or can be pulled,
# otherwise the one `make images` builds from Debian's package (karaoke-rabbitmq:debian);
# BROKER_IMAGE chooses. Waits until the server answers, then prints its address.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  echo "stack: no Docker engine answers (docker info failed)" >&2; exit 1
fi
if docker compose version >/dev/null 2>&1; then compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then compose=(docker-compose)
else echo "stack: neither \`docker compose\` nor \`docker-compose\` is installed" >&2; exit 1
fi

tag="${IMAGE_TAG:-latest}"
for image in karaoke-server karaoke-worker-separate karaoke-worker-video; do
  if ! docker image inspect "$image:$tag" >/dev/null 2>&1; then
    echo "stack: $image:$tag is missing; building the images (make images)"
    tools/images.sh; break
  fi
done

if [ -z "${BROKER_IMAGE:-}" ]; then
  official=rabbitmq:3.13-management
  if docker image inspect "$official" >/dev/null 2>&1 || timeout 120 docker pull -q "$official" >/dev/null 2>&1; then
    BROKER_IMAGE="$official"
  else
    echo "stack: $official is not here and cannot be pulled (no registry); using karaoke-rabbitmq:debian"
    BROKER_IMAGE=karaoke-rabbitmq:debian
    docker image inspect "$BROKER_IMAGE" >/dev/null 2>&1 || tools/images.sh
  fi
fi
export BROKER_IMAGE

port="${SERVER_PORT:-5000}"
# a port that something else holds (make broker's RabbitMQ on 61613 and 15672, make server on 5000
# and its data endpoint on 5001)
# would stop `up` half-way: say which, unless it is this stack's own
if ! "${compose[@]}" ps -q server 2>/dev/null | grep -q .; then
  for entry in "SERVER_PORT:$port" "STACK_BROKER_PORT:${STACK_BROKER_PORT:-61613}" \
               "STACK_MANAGEMENT_PORT:${STACK_MANAGEMENT_PORT:-15672}" "STACK_DATA_PORT:${STACK_DATA_PORT:-5001}"; do
    if timeout 1 bash -c "exec 3<>/dev/tcp/127.0.0.1/${entry#*:}" 2>/dev/null; then
      echo "stack: port ${entry#*:} is in use here (make broker's RabbitMQ, or make server?);" \
        "stop that, or choose another with ${entry%%:*}=..." >&2
      exit 1
    fi
  done
fi
"${compose[@]}" up -d --scale "worker=${WORKERS_HEALTHY:-2}"
for _ in $(seq 1 300); do
  if python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
       "http://127.0.0.1:$port/health" 2>/dev/null; then
    echo "stack: the server answers on http://localhost:$port/ (broker image $BROKER_IMAGE)"
    echo "stack: ${compose[*]} ps | logs -f | down"
    exit 0
  fi
  sleep 1
done
echo "stack: the server did not answer on port $port in 300 s; see: ${compose[*]} logs server" >&2
exit 1
