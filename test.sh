#!/usr/bin/env bash
# Set up (once) and run the whole test suite: lint, types, generated code, tests.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
. .venv/bin/activate
echo "== ruff"; ruff check . && ruff format --check .
echo "== mypy"; mypy && mypy examples
echo "== generated code"; python scripts/gen_protos.py --check
echo "== docs"; python scripts/gen_config_docs.py --check
echo "== pytest"; python -m pytest -q "$@"
