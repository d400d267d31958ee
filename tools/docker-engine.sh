#!/usr/bin/env bash
# A Docker engine for `make images`, `make stack` and tests/test_containers.py: does nothing when
# `docker info` answers; otherwise, as root, installs Debian's docker.io, docker-compose and
# mmdebstrap when missing and starts dockerd in the background (log: /var/log/dockerd.log).
# --iptables=false: the engine leaves the host's firewall alone (published ports go through
# docker-proxy); vfs: the one storage driver that works on any file system, overlay included.
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "docker-engine: no Docker engine answers and only root can start one" >&2; exit 1
fi
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "docker-engine: installing ${missing[*]} from Debian's packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! pgrep -x dockerd >/dev/null; then
  echo "docker-engine: starting dockerd (log: /var/log/dockerd.log)"
  setsid nohup dockerd --iptables=false --storage-driver="${DOCKER_STORAGE_DRIVER:-vfs}" \
    >>/var/log/dockerd.log 2>&1 </dev/null &
fi
for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done
echo "docker-engine: dockerd did not answer in 60 s; the end of /var/log/dockerd.log:" >&2
tail -20 /var/log/dockerd.log >&2
exit 1
