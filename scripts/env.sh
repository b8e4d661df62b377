#!/usr/bin/env bash
# Create or reuse .venv and install upcycle into it with the given extras.
# torch is installed only when it is not already importable (a GPU machine's own build is kept, and on the
# CPU development machines `torch==2.13.0` comes from the local disk instead of a multi-GB CUDA download).
set -euo pipefail
extras="${1:-}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv --system-site-packages .venv
fi
py=.venv/bin/python
$py -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23.2" >/dev/null
if ! $py -c "import torch" >/dev/null 2>&1; then
  echo "installing torch (CPU build 2.13.0)"
  $py -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
spec="."
[ -n "$extras" ] && spec=".[${extras}]"
$py -m pip install --quiet --disable-pip-version-check -e "$spec"
