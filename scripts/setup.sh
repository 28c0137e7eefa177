#!/usr/bin/env bash
# Set up tandem in ./.venv: torch (kept when the machine already has one; else the CPU build on a
# machine without an NVIDIA driver, see scripts/install_torch.sh), the package with its development
# extras, the generated gRPC code, and ./models/default.
# Idempotent: a second run only checks. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    # A GPU machine whose torch (with its CUDA build) is already installed: reuse it.
    echo "setup: reusing the torch already installed for $PYTHON"
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
scripts/install_torch.sh .venv/bin/python
# compat mode: the repo root goes on sys.path, so packages generated after the install
# (`openengine`, made by tandem.protogen below) import from the console script too.
"${PIP[@]}" install -q -e ".[dev]" --config-settings editable_mode=compat
.venv/bin/python -m tandem.protogen

if [ ! -e models/default ]; then
  if [ -d ../shared/models/stories260K ]; then
    mkdir -p models
    cp -r ../shared/models/stories260K models/default
    echo "setup: models/default <- ../shared/models/stories260K"
  else
    cat <<'MSG'
setup: no model at ./models/default. Point tandem at any Hugging Face model directory of a
supported architecture (Llama, Mistral, Qwen2/2.5, Qwen3) with config.json, *.safetensors and
tokenizer files, e.g.
    huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir models/default
or  export TANDEM_MODEL=/path/to/model      (or: tandem up --model /path/to/model)
MSG
  fi
fi
echo "setup: done (.venv/bin/tandem --help)"
