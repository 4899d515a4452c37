#!/usr/bin/env bash
# Prove the GPU paths on a CUDA machine in under five minutes: onnxruntime-gpu with the CUDA
# provider behind the gateway (answers checked against numpy), plus a short benchmark beside the
# CPU provider. Run from the repository root: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-gpu
.venv-gpu/bin/pip install --quiet --upgrade pip
.venv-gpu/bin/pip install --quiet -e .
.venv-gpu/bin/pip uninstall --quiet -y onnxruntime
.venv-gpu/bin/pip install --quiet "onnxruntime-gpu>=1.18,<2"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 240 .venv-gpu/bin/python -m infergate.benchmarks.gpu_check
