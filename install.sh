#!/usr/bin/env bash
# Set up .venv with unimedvl-core and its dependencies.
#   bash install.sh          runtime
#   bash install.sh test     runtime + test dependencies
# torch 2.13.0 (CPU build) is installed first when the environment has no torch, because a looser torch
# requirement would pull a multi-GB CUDA build; an existing torch (e.g. a CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
venv=${UNIMEDVL_VENV:-.venv}
extras=${1:-}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==2.13.0"
fi
if [ -n "$extras" ]; then
  "${pip[@]}" -e ".[$extras]"
else
  "${pip[@]}" -e .
fi
echo "installed into $venv ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
