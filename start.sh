#!/usr/bin/env bash
# Set up (once) and run a locod peer. Arguments go to `locod start`; with none, this
# starts a new run of the default model on the default corpus (Ctrl-C stops it cleanly).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/locod start "$@"
