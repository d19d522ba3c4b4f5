#!/usr/bin/env bash
# The main job: guardkit-server with the embedded default model (SmolLM2-135M-Instruct) and the
# built-in policies, then a guarded call against it. Stops the server when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=${GUARDKIT_PORT:-8600}
LOG=${GUARDKIT_DEMO_LOG:-$(mktemp -t guardkit-server.XXXXXX.log)}

echo "demo: starting guardkit-server on port $PORT (log: $LOG)"
"$PY" -m guardkit_server.cli start --port "$PORT" >"$LOG" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT

for _ in $(seq 1 300); do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "demo: the server exited:"; tail -20 "$LOG"; exit 1
  fi
  if "$PY" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/ready', timeout=2).status_code != 200)" 2>/dev/null; then
    break
  fi
  sleep 1
done
grep "guardkit-server:" "$LOG" || true

GUARDKIT_BASE_URL="http://127.0.0.1:$PORT" "$PY" examples/quickstart.py
