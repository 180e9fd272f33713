#!/usr/bin/env bash
# Create .venv and install parcae with the tested torch, without pulling a multi-GB CUDA build on CPU
# machines (litdata depends on torchvision, which would otherwise upgrade torch; see docs/install.md).
# Idempotent: a second run only checks the environment. PARCAE_REINSTALL=1 forces a reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PYTHON --version 2>&1)"
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

if [ "${PARCAE_REINSTALL:-0}" != 1 ] && python -c "import parcae, lightning, litdata, tokenizers, lm_eval, transformers, peft, xdist" 2>/dev/null \
    && [ "$(python -c 'import parcae, pathlib; print(pathlib.Path(parcae.__file__).resolve().parent.parent)')" = "$(pwd -P)" ]; then
    echo "[setup] .venv is ready ($(python -c 'import torch; print("torch", torch.__version__)'))"
    exit 0
fi

python -m pip install --quiet --upgrade pip
TORCH_PIN=$(grep -E '^torch==' constraints.txt)
if python -c "import torch" 2>/dev/null; then
    echo "[setup] keeping installed torch $(python -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1; then
    echo "[setup] GPU machine: installing $TORCH_PIN (CUDA build)"
    python -m pip install --quiet "$TORCH_PIN"
elif python - <<'PY' 2>/dev/null
import urllib.request
urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=5)
PY
then
    echo "[setup] CPU machine: installing $TORCH_PIN from the PyTorch CPU index"
    python -m pip install --quiet "$TORCH_PIN" --extra-index-url https://download.pytorch.org/whl/cpu
else
    echo "[setup] installing $TORCH_PIN from the default index"
    python -m pip install --quiet "$TORCH_PIN"
fi

echo "[setup] installing parcae and its dependencies (torch held at the constraint)"
python -m pip install --quiet -c constraints.txt -e '.[test,eval]'
# litdata declares torchvision, but token shards never import it, and a torchvision built for another
# torch breaks `import lightning` ("operator torchvision::nms does not exist").
python -m pip uninstall --quiet -y torchvision 2>/dev/null || true
python -c "import parcae, lightning, litdata, torch; print('[setup] ready: torch', torch.__version__, '| lightning', lightning.__version__, '| litdata', litdata.__version__)"
