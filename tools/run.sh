#!/usr/bin/env bash
# make run: workers in the background, the server in the foreground; Ctrl-C stops both.
set -euo pipefail
PY=.venv/bin/python
$PY -m src.audio_worker.supervisor &
workers=$!
trap 'kill $workers 2>/dev/null; wait $workers 2>/dev/null' EXIT INT TERM
echo "Open http://${SERVER_HOST:-127.0.0.1}:${SERVER_PORT:-5000}/ in a browser"
$PY -m src.server
