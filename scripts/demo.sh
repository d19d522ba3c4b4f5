#!/usr/bin/env bash
# The main job: guardkit-server with the embedded default model (SmolLM2-135M-Instruct) and the
# built-in policies, then guarded calls against it:
#   1. examples/quickstart.py   — client.check() of a benign and a jailbreak conversation;
#   2. examples/openai_app.py   — an OpenAI client wrapped with guard(), talking to a local
#                                 OpenAI-compatible LLM (vLLM serving the same SmolLM2 on CPU).
# Both servers are stopped when the script ends. Set GUARDKIT_DEMO_LLM=0 to skip step 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=${GUARDKIT_PORT:-8600}
LLM_PORT=${GUARDKIT_DEMO_LLM_PORT:-8601}
WITH_LLM=${GUARDKIT_DEMO_LLM:-1}
LOGS=$(mktemp -d -t guardkit-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

wait_for() {  # url pid log
  for _ in $(seq 1 400); do
    if ! kill -0 "$2" 2>/dev/null; then echo "demo: a server exited:"; tail -20 "$3"; exit 1; fi
    "$PY" -c "import httpx,sys; sys.exit(httpx.get('$1', timeout=2).status_code != 200)" 2>/dev/null && return 0
    sleep 1
  done
  echo "demo: $1 not ready in time"; tail -20 "$3"; exit 1
}

# Convert the embedded model once, before two processes want it.
MODEL_DIR=$("$PY" -c "from guardkit_server.engine.assets import ensure_default_model; print(ensure_default_model())")

echo "demo: starting guardkit-server on port $PORT (log: $LOGS/guardkit-server.log)"
"$PY" -m guardkit_server.cli start --port "$PORT" >"$LOGS/guardkit-server.log" 2>&1 &
pids+=($!); guard_pid=$!
if [ "$WITH_LLM" = 1 ]; then
  echo "demo: starting a local OpenAI-compatible LLM on port $LLM_PORT (log: $LOGS/llm.log)"
  GUARDKIT_VLLM_PLUGIN=0 "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
    --served-model-name smollm2 --port "$LLM_PORT" --max-model-len 2048 \
    --kv-cache-memory-bytes $((1 << 30)) --max-num-seqs 8 --enforce-eager --disable-log-stats \
    >"$LOGS/llm.log" 2>&1 &
  pids+=($!); llm_pid=$!
fi

wait_for "http://127.0.0.1:$PORT/ready" "$guard_pid" "$LOGS/guardkit-server.log"
grep "guardkit-server:" "$LOGS/guardkit-server.log" || true

echo; echo "== guarded check (examples/quickstart.py) =="
GUARDKIT_BASE_URL="http://127.0.0.1:$PORT" "$PY" examples/quickstart.py

if [ "$WITH_LLM" = 1 ]; then
  wait_for "http://127.0.0.1:$LLM_PORT/v1/models" "$llm_pid" "$LOGS/llm.log"
  echo; echo "== guarded OpenAI calls (examples/openai_app.py) =="
  GUARDKIT_BASE_URL="http://127.0.0.1:$PORT" OPENAI_BASE_URL="http://127.0.0.1:$LLM_PORT/v1" \
    OPENAI_API_KEY=local OPENAI_MODEL=smollm2 "$PY" examples/openai_app.py
fi
echo; echo "demo: done"
