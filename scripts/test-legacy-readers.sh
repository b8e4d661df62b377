#!/usr/bin/env bash
# Upcycled checkpoints in transformers 4.x readers, which read only rope_theta / rope_scaling (not rope_parameters):
# each native MoE class is loaded by the oldest 4.x release that has it, and every case by the newest 4.x, in
# .venv-legacy (torch 2.13, no upcycle), and must reproduce transformers 5's DENSE logits within 1e-5 (fp32).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$SECONDS
[ -x .venv/bin/python ] || bash scripts/env.sh test

# A transformers release, then the cases it loads. The oldest 4.x wheel with models/<name>/modeling_<name>.py:
#   mixtral 4.36.0, qwen2_moe 4.40.0, qwen3_moe 4.51.0, dots1 4.53.0, glm4_moe 4.54.0. The other families' targets
#   that 4.x has (flex_olmo, ernie4_5_moe, hunyuan_v1_moe, granitemoe) are read by 4.57.6.
# qwen3_moe is read by 4.51.1: 4.51.0's from_pretrained calls accelerate's init_empty_weights, which it imports only
# when accelerate is installed (NameError for every model without it); 4.51.1 vendors that function, and its
# qwen3_moe, configuration, rope and auto-class code are byte-identical to 4.51.0's.
# 4.57.6 is the newest 4.x (where the SmolLM2 default-theta error was measured). mixtral_no_rope_theta is the
# canary: the Mixtral checkpoint without the legacy rope fields, which a 4.x reader must get wrong.
checks=(
  "4.36.0 mixtral mixtral_no_rope_theta smollm2"
  "4.40.0 qwen2_moe"
  "4.51.1 qwen3_moe"
  "4.53.0 dots1"
  "4.54.0 glm4_moe"
  "4.57.6 mixtral mixtral_no_rope_theta qwen2_moe qwen3_moe dots1 glm4_moe flex_olmo ernie4_5_moe hunyuan_v1_moe granitemoe smollm2"
)

venv=.venv-legacy
py="$venv/bin/python"
mkdir -p .cache
work="$(mktemp -d "$root/.cache/legacy-readers.XXXXXX")"  # 2.7 GB of checkpoints (SmolLM2 E8), removed at exit
trap 'rm -rf "$work"' EXIT
quiet() { "$@" >"$work/pip.log" 2>&1 || { cat "$work/pip.log" >&2; return 1; }; }  # pip's output only on failure
pip_install() { quiet "$py" -m pip install --disable-pip-version-check --no-compile "$@"; }

# An isolated venv: the old releases see only the dependencies pip resolves for them (numpy 2 works for all).
if [ ! -x "$py" ]; then
  python3 -m venv "$venv"
  quiet "$py" -m pip install --disable-pip-version-check --upgrade "pip>=23.2"
fi
"$py" -c "import torch" >/dev/null 2>&1 || pip_install "torch==2.13.0"

echo "legacy readers: building the upcycled checkpoints and dense logits with transformers 5"
.venv/bin/python tests/legacy_readers/make_references.py "$work/refs"

failed=0
for check in "${checks[@]}"; do
  read -r version cases <<<"$check"
  pip_install "transformers==$version"
  # shellcheck disable=SC2086  # the case names are words
  "$py" tests/legacy_readers/check_logits.py "$work/refs" $cases | tee -a "$work/results" || failed=1
done
echo "legacy readers took $((SECONDS - start)) s"
echo "legacy-readers: $(grep -c '^ok' "$work/results") passed, $(grep -c '^FAIL' "$work/results") failed"
exit $failed
