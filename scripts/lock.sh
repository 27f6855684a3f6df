#!/usr/bin/env bash
# Writes requirements/cpu.txt: every package of the CPU set-up (extras cpu and dev) at an exact
# version with its hashes, resolved by uv for Python 3.11 on x86_64 Linux, without the CUDA
# packages named in requirements/cpu-exclude.txt. scripts/setup_env.sh installs exactly it.
# Its first line is a fingerprint of pyproject.toml's dependency lists: a change there makes the lock
# stale (setup re-locks; commit the new lock).
#   scripts/lock.sh           re-lock
#   scripts/lock.sh --check   fail if the lock is stale, and check that the GPU extras still resolve
#   scripts/lock.sh --if-stale   re-lock only if stale (scripts/setup_env.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
PYTHON=${PYTHON:-python3}
LOCK=requirements/cpu.txt
TARGET=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
# torch's +cpu wheel is not on PyPI: this machine keeps it on disk (as pip's own config says),
# elsewhere PyTorch's CPU index has it.
TORCH_FIND_LINKS=${TORCH_FIND_LINKS:-$([ -d /opt/wheels ] && echo /opt/wheels || echo https://download.pytorch.org/whl/cpu/torch/)}

fingerprint() {
  "$PYTHON" -c 'import hashlib, json, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print(hashlib.sha256(json.dumps([p["dependencies"], p["optional-dependencies"]], sort_keys=True).encode()).hexdigest())'
}

if [ "${1:-}" = --if-stale ]; then  # set-up: re-lock only when pyproject.toml's dependencies changed
  if [ "$(head -n 1 "$LOCK" 2>/dev/null)" = "# pyproject-dependencies-sha256: $(fingerprint)" ]; then exit 0; fi
  echo "[setup] pyproject.toml's dependencies changed since $LOCK was written: re-locking (commit it)"
elif [ "${1:-}" = --check ]; then
  want="# pyproject-dependencies-sha256: $(fingerprint)"
  if [ "$(head -n 1 "$LOCK")" != "$want" ]; then
    echo "$LOCK is stale: pyproject.toml's dependencies changed since it was written; run make lock and commit it" >&2
    exit 1
  fi
  # The GPU path is not locked (its torch and vLLM come from PyPI as they are): it must still resolve.
  "$UV" pip compile -q pyproject.toml --extra gpu --extra dev "${TARGET[@]}" -o /dev/null
  echo "lock: $LOCK is current; the GPU extras resolve"
  exit 0
fi

tmp=$(mktemp)
# The current lock's versions are uv's preferences: adding one package moves no other.
grep -v '^# pyproject-dependencies-sha256' "$LOCK" > "$tmp" 2>/dev/null || true
"$UV" pip compile -q pyproject.toml --extra cpu --extra dev "${TARGET[@]}" --generate-hashes \
  --override requirements/cpu-exclude.txt --find-links "$TORCH_FIND_LINKS" \
  --custom-compile-command "scripts/lock.sh" -o "$tmp"
{ echo "# pyproject-dependencies-sha256: $(fingerprint)"; cat "$tmp"; } > "$LOCK"
rm -f "$tmp"
echo "lock: wrote $LOCK ($(grep -c '^[a-z0-9]' "$LOCK") packages)"
