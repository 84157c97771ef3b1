#!/usr/bin/env bash
# Install this project and everything it needs into the current Python environment.
# With no torch present it installs torch 2.13.0 first (the CPU build on CPU-only machines that keep
# it locally); a machine that already has its own torch build (CUDA, ROCm) keeps it.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
# dask: `prepare text/images ... -- --runner DaskRunner` on a Dask cluster or a local one.
"$PYTHON" -m pip install --quiet -e ".[prepare,dask,hf,test]"
