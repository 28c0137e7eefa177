#!/usr/bin/env bash
# Install torch into the environment of PYTHON (default .venv/bin/python) unless it has one.
# Usage: scripts/install_torch.sh [PYTHON]
#
# The pin (TANDEM_TORCH_VERSION, default 2.13.0, the tested release) alone does not choose the
# build: on Linux the default index's wheel of the pin is the CUDA build, gigabytes of CUDA
# libraries. So:
#   - NVIDIA driver present (nvidia-smi on PATH, or /proc/driver/nvidia): the default index's
#     wheel, the CUDA build.
#   - no NVIDIA driver: the CPU build from https://download.pytorch.org/whl/cpu (about 200 MB)
#     first; only if that fails (e.g. no route to that index) the default index's wheel, which on
#     Linux is the CUDA build unless your pip configuration serves a CPU wheel (find-links or an
#     extra index). The CPU attempt gives up after one retry of 15 s, so the fallback is quick.
# TANDEM_TORCH_INDEX_URL=URL installs from URL and nothing else (e.g. .../whl/cu128).
set -euo pipefail

PYTHON=${1:-.venv/bin/python}
if "$PYTHON" -c "import torch" 2>/dev/null; then
  exit 0
fi
TORCH="torch==${TANDEM_TORCH_VERSION:-2.13.0}"
PIP=("$PYTHON" -m pip --disable-pip-version-check)
CPU_INDEX=https://download.pytorch.org/whl/cpu

if [ -n "${TANDEM_TORCH_INDEX_URL:-}" ]; then
  echo "setup: installing $TORCH from $TANDEM_TORCH_INDEX_URL"
  exec "${PIP[@]}" install -q --index-url "$TANDEM_TORCH_INDEX_URL" "$TORCH"
fi
if command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia ]; then
  echo "setup: NVIDIA driver found; installing $TORCH from the default index (the CUDA build, several GB)"
  exec "${PIP[@]}" install -q "$TORCH"
fi
echo "setup: no NVIDIA driver (no nvidia-smi, no /proc/driver/nvidia); installing the CPU build of $TORCH from $CPU_INDEX"
if "${PIP[@]}" install -q --retries 1 --timeout 15 --index-url "$CPU_INDEX" "$TORCH"; then
  exit 0
fi
echo "setup: the CPU index did not provide $TORCH; installing it from the default index instead" \
  "(on Linux that is the CUDA build, several GB, unless your pip configuration serves a CPU wheel)"
exec "${PIP[@]}" install -q "$TORCH"
