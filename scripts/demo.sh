#!/usr/bin/env bash
# Set up (first run only) and run `upcycle demo` on the embedded default model, SmolLM2-135M.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/env.sh" demo
exec "$root/.venv/bin/upcycle" demo "$@"
