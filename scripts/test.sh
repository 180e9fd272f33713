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
# Two pytest workers, one test file each at a time (pytest-xdist, --dist loadfile: a file's session fixtures and
# its order stay together): on 2 cores the suite takes ~8 min instead of ~11, since many tests wait on process
# launches. PARCAE_TEST_WORKERS=0 (or giving -n / -p no:xdist yourself) runs it in one process.
workers=${PARCAE_TEST_WORKERS:-2}
if [ "$workers" != 0 ] && python -c "import xdist" 2>/dev/null && [[ " $* " != *" -n "* && " $* " != *"no:xdist"* ]]; then
    set -- -n "$workers" --dist loadfile "$@"
fi
python -m pytest "$@"
