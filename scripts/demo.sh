#!/usr/bin/env bash
# The main job: set up .venv, then build the debug Parcae model and run one training forward with
# per-sequence depths, printing parameters by part, FLOPs per token and loop telemetry.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
parcae model parcae-debug
