#!/usr/bin/env bash
# The main job: set up, then run the whole DVC pipeline on the embedded sample corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source .venv/bin/activate
dvc repro "$@"
echo
cat reports/summary.md 2>/dev/null || true
