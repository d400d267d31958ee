#!/usr/bin/env bash
# make broker-cluster: three clustered RabbitMQ nodes on this host, each with STOMP and the
# management plugin, and the deployment's logins, policies and queues provisioned on them.
# Prints the BROKER_HOSTS and BROKER_MANAGEMENT_URL values that point the server and the
# workers at the cluster. Starts nothing when all three STOMP ports already answer.
#
#   tools/broker-cluster.sh [up]        start what is down, cluster, provision, print the settings
#   tools/broker-cluster.sh start       the same without provisioning (tests/test_cluster.py, whose
#                                       own logins and queues need none; it takes ~15 s)
#   tools/broker-cluster.sh stop [N..]  stop the nodes (all three, or nodes N of 1 2 3)
#
# Docker compose (docker-compose.rabbitmq-cluster.yml) where a Docker engine, a compose command and
# the rabbitmq:3.13-management image are here and BROKER_CLUSTER_LOCAL is not 1; otherwise local
# rabbitmq-server nodes, as root (the Debian wrappers run them as the rabbitmq user):
#
#   node            STOMP   management  AMQP  Erlang distribution
#   rabbit-1@<host> 61621   15621       5621  25621
#   rabbit-2@<host> 61622   15622       5622  25622
#   rabbit-3@<host> 61623   15623       5623  25623
#
# <host> is the short host name. None of these ports clash with `make broker`'s single node
# (5672, 25672, 61613, 15672), which keeps running beside them. Each node keeps its config,
# plugins list, mnesia and logs in $BROKER_CLUSTER_DIR/rabbit-N (default
# /var/lib/rabbitmq-cluster), reads its own rabbitmq-env.conf there rather than
# /etc/rabbitmq's (whose NODENAME is the single node's), and shares the rabbitmq user's
# Erlang cookie, so the three can cluster and rabbitmqctl -n rabbit-N@<host> reaches each.
# AMQP and the Erlang distribution listen on 127.0.0.1 only; STOMP and the management API
# on every interface, as the single node's do, so workers on other hosts can reach them.
# Nodes 2 and 3 join node 1 when they are new; a node that was stopped or killed comes back
# into the cluster it had joined.
set -euo pipefail
cd "$(dirname "$0")/.."

short="$(hostname -s)"
base="${BROKER_CLUSTER_DIR:-/var/lib/rabbitmq-cluster}"
# `docker compose`, else the v1 `docker-compose` (Debian's docker.io has no compose plugin)
if docker compose version >/dev/null 2>&1 || ! command -v docker-compose >/dev/null 2>&1; then
  compose="docker compose -f docker-compose.rabbitmq-cluster.yml"
else
  compose="docker-compose -f docker-compose.rabbitmq-cluster.yml"
fi
compose_image=rabbitmq:3.13-management
NODES=(1 2 3)

node_name() { echo "rabbit-$1@$short"; }
stomp_port() { echo $((61620 + $1)); }
mgmt_port() { echo $((15620 + $1)); }
amqp_port() { echo $((5620 + $1)); }
dist_port() { echo $((25620 + $1)); }

answers() { timeout 1 bash -c "exec 3<>/dev/tcp/localhost/$1" 2>/dev/null; }
all_answer() {
  for n in "${NODES[@]}"; do answers "$(stomp_port "$n")" || return 1; done
}
wait_for_stomp() {
  for _ in $(seq 1 180); do answers "$(stomp_port "$1")" && return 0; sleep 1; done
  echo "broker-cluster: STOMP port $(stomp_port "$1") of node $1 did not open" >&2; return 1
}

use_docker() {  # compose only where an engine, a compose command and the image are here; says why not
  [ "${BROKER_CLUSTER_LOCAL:-0}" != 1 ] || return 1
  local reason=""
  if ! command -v docker >/dev/null 2>&1; then reason="docker is not installed"
  elif ! docker info >/dev/null 2>&1; then reason="no Docker engine answers (docker info failed)"
  elif ! ${compose%% -f*} version >/dev/null 2>&1; then reason="neither \`docker compose\` nor \`docker-compose\` is installed"
  elif ! docker image inspect "$compose_image" >/dev/null 2>&1 \
       && ! timeout 300 docker pull -q "$compose_image" >/dev/null 2>&1; then
    reason="the image $compose_image is not here and cannot be pulled"
  fi
  [ -z "$reason" ] && return 0
  echo "broker-cluster: not with docker compose: $reason; local rabbitmq-server nodes instead"
  return 1
}
docker_running() { $compose ps -q rabbit-1 2>/dev/null | grep -q .; }

# -- local nodes ------------------------------------------------------------------------------

configure_node() {  # the files of node $1, rewritten on every start so that they match this script
  local n="$1" dir="$base/rabbit-$1"
  mkdir -p "$dir/mnesia" "$dir/log"
  cat >"$dir/rabbitmq.conf" <<EOF
# written by tools/broker-cluster.sh
listeners.tcp.1 = 127.0.0.1:$(amqp_port "$n")
stomp.listeners.tcp.1 = $(stomp_port "$n")
management.tcp.port = $(mgmt_port "$n")
# results carry every stem of a chunk (as docker-compose.rabbitmq.yml)
max_message_size = 134217728
EOF
  echo "[rabbitmq_management,rabbitmq_stomp]." >"$dir/enabled_plugins"
  cat >"$dir/rabbitmq-env.conf" <<EOF
# written by tools/broker-cluster.sh; read instead of /etc/rabbitmq/rabbitmq-env.conf
NODENAME=$(node_name "$n")
NODE_PORT=$(amqp_port "$n")
DIST_PORT=$(dist_port "$n")
CONFIG_FILE=$dir/rabbitmq.conf
ENABLED_PLUGINS_FILE=$dir/enabled_plugins
MNESIA_BASE=$dir/mnesia
LOG_BASE=$dir/log
PID_FILE=$dir/rabbit.pid
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
  chown -R rabbitmq:rabbitmq "$base"
}

boot() {  # start node $1 in the background (its VM detaches)
  RABBITMQ_CONF_ENV_FILE="$base/rabbit-$1/rabbitmq-env.conf" rabbitmq-server -detached
}
registered() { epmd -names 2>/dev/null | grep -q "^name rabbit-$1 at port"; }

start_local() {
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "broker-cluster: installing rabbitmq-server from Debian's packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
  fi
  local pending=() n
  for n in "${NODES[@]}"; do
    answers "$(stomp_port "$n")" && continue
    configure_node "$n"
    # all at once: a node that was part of the cluster waits at boot for the others' tables
    echo "broker-cluster: starting $(node_name "$n") (STOMP $(stomp_port "$n"))"
    boot "$n"
    pending+=("$n")
  done
  # RabbitMQ 3.10 can stop a node that boots while its peers boot too (its feature flags sync
  # with a peer not ready yet: incompatible_feature_flags, badmap): a node whose VM went away
  # from epmd before its STOMP port opened is started again, up to three times
  local -A seen=() starts=() since=()
  local deadline=$((SECONDS + 300))
  for n in "${pending[@]}"; do seen[$n]=0; starts[$n]=1; since[$n]=$SECONDS; done
  while [ ${#pending[@]} -gt 0 ]; do
    local waiting=()
    for n in "${pending[@]}"; do
      if answers "$(stomp_port "$n")"; then continue; fi
      if registered "$n"; then seen[$n]=1
      elif [ "${seen[$n]}" = 1 ] || [ $((SECONDS - since[$n])) -gt 60 ]; then
        if [ "${starts[$n]}" -ge 3 ]; then
          echo "broker-cluster: $(node_name "$n") stopped while booting, three times; see $base/rabbit-$n/log" >&2
          return 1
        fi
        echo "broker-cluster: $(node_name "$n") stopped while booting; starting it again"
        boot "$n"; seen[$n]=0; starts[$n]=$((starts[$n] + 1)); since[$n]=$SECONDS
      fi
      waiting+=("$n")
    done
    pending=("${waiting[@]+"${waiting[@]}"}")
    if [ ${#pending[@]} -gt 0 ] && [ $SECONDS -gt $deadline ]; then
      echo "broker-cluster: STOMP did not open on node(s) ${pending[*]} in 300 s; see $base/rabbit-N/log" >&2
      return 1
    fi
    if [ ${#pending[@]} -gt 0 ]; then sleep 1; fi
  done
  for n in "${NODES[@]}"; do rabbitmqctl -q -n "$(node_name "$n")" await_startup >/dev/null; done
  local members
  members="$(rabbitmqctl -q -n "$(node_name 1)" cluster_status --formatter json)"
  for n in 2 3; do
    if ! grep -q "\"$(node_name "$n")\"" <<<"$members"; then
      echo "broker-cluster: $(node_name "$n") joins $(node_name 1)"
      local out
      # the CLI logs the joining node's warnings (feature flags, tracking tables): shown only on failure
      if ! out="$(for step in stop_app reset "join_cluster $(node_name 1)" start_app; do
                    # shellcheck disable=SC2086  # $step is a command and its argument
                    rabbitmqctl -q -n "$(node_name "$n")" $step || exit 1
                  done 2>&1)"; then
        echo "$out" >&2; echo "broker-cluster: $(node_name "$n") could not join $(node_name 1)" >&2; return 1
      fi
      wait_for_stomp "$n"
    fi
  done
}

stop_local() {
  local pids=()
  for n in "$@"; do
    if rabbitmqctl -q -n "$(node_name "$n")" status >/dev/null 2>&1; then
      echo "broker-cluster: stopping $(node_name "$n")"
      # together: one at a time, each waits for the quorum queues it leads to hand over
      rabbitmqctl -q -n "$(node_name "$n")" stop >/dev/null & pids+=($!)
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

# -- provisioning ---------------------------------------------------------------------------

hosts="$(for n in "${NODES[@]}"; do printf 'localhost:%s,' "$(stomp_port "$n")"; done)"
hosts="${hosts%,}"
urls="$(for n in "${NODES[@]}"; do printf 'http://localhost:%s,' "$(mgmt_port "$n")"; done)"
urls="${urls%,}"

provision() {  # $1: how to run rabbitmqctl against node 1
  if [ ! -x .venv/bin/python ]; then
    echo "broker-cluster: no .venv yet (make install); logins not provisioned"; return 0
  fi
  # its declaring connection goes to the cluster, not to BROKER_HOST
  BROKER_HOSTS="$hosts" .venv/bin/python -m src.messaging.accounts --ctl "$1" --worker-login "${WORKER_LOGIN:-}"
  # quorum queues replicate over the nodes that are cluster members when they are declared
  local prefix="${QUEUE_PREFIX:-karaoke}" expected="${#NODES[@]}" bad=0 vhost
  # the deployment's virtual host, as the processes will read it (make broker's /{prefix})
  vhost="$(BROKER_HOSTS="$hosts" .venv/bin/python -c 'from src import config; print(config.load().broker_vhost)')"
  while IFS=$'\t' read -r name type members; do
    case "$name" in "$prefix".jobs.*|"$prefix".results) ;; *) continue ;; esac
    count="$(grep -o '@' <<<"$members" | wc -l)"
    if [ "$type" != quorum ] || [ "$count" -ne "$expected" ]; then
      echo "broker-cluster: queue $name is a $type queue with $count member(s), not a quorum queue on $expected" >&2
      bad=1
    fi
  done < <($1 -q list_queues -p "$vhost" name type members)
  [ "$bad" = 0 ] && echo "broker-cluster: the jobs and results queues of $prefix are quorum queues on $expected nodes"
  return "$bad"
}

# -- main -------------------------------------------------------------------------------------

action="${1:-up}"
case "$action" in
  up | start) ;;
  stop)
    shift
    if docker_running; then
      if [ $# -eq 0 ]; then $compose down; else $compose stop "${@/#/rabbit-}"; fi
      exit 0
    fi
    stop_local "${@:-${NODES[@]}}"; exit 0 ;;
  *) echo "usage: $0 [up | start | stop [1 2 3]]" >&2; exit 2 ;;
esac

if docker_running || { ! all_answer && use_docker; }; then
  ctl="$compose exec -T rabbit-1 rabbitmqctl"
  if ! all_answer; then
    echo "broker-cluster: starting three RabbitMQ nodes with docker compose"
    $compose up -d
    for n in "${NODES[@]}"; do wait_for_stomp "$n"; done
  fi
elif all_answer; then
  echo "broker-cluster: STOMP answers on $hosts"
  ctl="rabbitmqctl -n $(node_name 1)"
else
  start_local
  ctl="rabbitmqctl -n $(node_name 1)"
fi
echo "broker-cluster: ready: $($ctl -q cluster_status --formatter json | grep -o 'running_nodes":\[[^]]*' \
  | sed 's/running_nodes":\[//; s/"//g')"
[ "$action" = up ] && provision "$ctl"
echo "BROKER_HOSTS=$hosts"
echo "BROKER_MANAGEMENT_URL=$urls"
