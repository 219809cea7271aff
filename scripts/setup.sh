#!/usr/bin/env bash
# Create .venv (once) and install locod with its test tools and the hf extra into it
# (transformers, tokenizers, safetensors, pyarrow: the tests cover hf: models and tokenizers).
#
# torch is installed first at a pinned CPU-friendly version when the venv has none:
# pyproject.toml keeps a range so that users with GPUs get their own build, but an
# unpinned install would pull a multi-GB CUDA build onto CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "locod needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
VENV_PY=.venv/bin/python
stamp=.venv/.locod-installed
want="$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
"$VENV_PY" -m pip install --quiet --upgrade pip
if ! "$VENV_PY" -c 'import torch' 2>/dev/null; then
    "$VENV_PY" -m pip install --quiet "torch==${LOCOD_TORCH_VERSION:-2.13.0}"
fi
"$VENV_PY" -m pip install --quiet -e ".[test,hf]"
echo "$want" > "$stamp"
