#!/usr/bin/env bash
# The oldest supported transformers (5.17): a second venv, the conversion, exactness, verification, training and
# evaluation tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv=.venv-oldest
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv --system-site-packages "$venv"
fi
py="$venv/bin/python"
$py -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23.2" >/dev/null
if ! $py -c "import torch" >/dev/null 2>&1; then
  $py -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
$py -m pip install --quiet --disable-pip-version-check -e ".[test]" "transformers==5.17.0"
$py -c "import transformers; print('transformers', transformers.__version__)"
exec $py -m pytest -q tests/test_convert_methods.py tests/test_verify.py tests/test_bad_input.py tests/test_train.py \
  tests/test_exactness_cases.py tests/test_config_check.py tests/test_output_safety.py tests/test_verify_streaming.py \
  tests/test_kernels.py tests/test_families.py tests/test_parallel_layout.py tests/test_proof_integrity.py \
  tests/test_downstream.py tests/test_random_init.py tests/test_hub.py tests/test_merge.py tests/test_token_dropping.py \
  tests/test_kernel_self_check.py "$@"
