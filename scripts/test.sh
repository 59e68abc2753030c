#!/usr/bin/env bash
# Run the whole test suite in both supported TRL environments:
#   .venv        -> latest TRL (1.16)
#   .venv-trl112 -> TRL 1.12, the [ppo] extra (the last TRL with trl.experimental.ppo)
# Each environment is created on first use (scripts/setup_env.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
failed=()
for flavor in latest trl112; do
  bash scripts/setup_env.sh "$flavor"
  venv=.venv; [ "$flavor" = trl112 ] && venv=.venv-trl112
  echo "== tests in $venv ($("$venv/bin/python" -c 'import trl; print("TRL", trl.__version__)'))"
  "$venv/bin/python" -m pytest "$@" || failed+=("$venv")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED in: ${failed[*]}" >&2
  exit 1
fi
