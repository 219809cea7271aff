#!/usr/bin/env bash
# The CUDA training path, checked and measured in under 8 minutes (see benchmarks/gpu_check.py).
# On a machine without a GPU it says so and exits 0. Arguments go to the script (--write).
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 .venv/bin/python -m benchmarks.gpu_check "$@"
