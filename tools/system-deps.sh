#!/usr/bin/env bash
# Debian packages the project needs and a fresh machine may lack: ffmpeg (decode/encode),
# tshark (make capture, dissector tests), chromium (browser tests), curl (a client the tests replay),
# prometheus (its binaries prometheus and promtool: tests/test_prometheus.py runs a real one).
# Installs only what is missing.
set -euo pipefail
missing=()
command -v ffmpeg >/dev/null 2>&1 || missing+=(ffmpeg)
command -v tshark >/dev/null 2>&1 || missing+=(tshark)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v curl >/dev/null 2>&1 || missing+=(curl)
prometheus=()
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || prometheus=(prometheus)
wanted=("${missing[@]}" "${prometheus[@]}")
[ ${#wanted[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
  echo "Please install: ${wanted[*]} (Debian: apt-get install -y ${wanted[*]})" >&2; exit 1
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
echo "installing ${wanted[*]}"
$SUDO apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ ${#prometheus[@]} -gt 0 ]; then
  # Only the binaries are wanted: the tests start their own Prometheus on a free port. Debian's
  # postinst would start prometheus.service (port 9090) through invoke-rc.d or deb-systemd-invoke,
  # and its recommended node exporter (port 9100) too: leave the recommends out, and deny service
  # starts for this install with a policy-rc.d (both honour it) unless the machine already has one.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\n# tools/system-deps.sh: no service starts while it installs prometheus\nexit 101\n' \
      | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 755 "$policy"
    trap '$SUDO rm -f "$policy"' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${prometheus[@]}" >/dev/null
  # a machine whose own policy allowed the start (or a systemd that started it anyway): stop it and
  # keep it from starting at boot; nothing here needs the packaged service
  if [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ]; then
    $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi
