#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite on CPU (offline, ~minutes).
#   ./scripts/test.sh            # everything
#   ./scripts/test.sh -k parity  # extra arguments go to pytest
#   ./scripts/test.sh -m "not slow"   # the quick lane: no whole training runs, torchrun, wheel, vLLM or
#                                     # signal tests (markers: slow, distributed, subprocess, vllm; pyproject.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export LITDATA_DISABLE_VERSION_CHECK=1 PYTHONUNBUFFERED=1
python -m pytest "$@"
