#!/usr/bin/env bash
# Run TRL's own trainer test files offline, stock and with trl_regularizers' classes swapped in; compare.
#   TRL_SRC=/path/to/trl-git-dir-or-checkout [TRL_REF=v1.16.0] [PYTHON=.venv/bin/python] \
#     bash scripts/trl_tests.sh [extra pytest args, e.g. -k "not vlm"]
# TRL_SRC: a git clone (or bare mirror) of TRL; its tests/ and scripts/ at TRL_REF (default: the tag of the
# installed TRL, v<version>) are exported to $TRL_TESTS_WORK (default: outputs/trl_tests). Results:
# $TRL_TESTS_WORK/{stock,swapped}.xml and compare.md (the tests that pass stock and fail swapped). See docs/trl_tests.md.
set -euo pipefail
cd "$(dirname "$0")/.."
repo_root=$PWD
PYTHON="${PYTHON:-$repo_root/.venv/bin/python}"
: "${TRL_SRC:?set TRL_SRC to a git clone or mirror of https://github.com/huggingface/trl (docs/trl_tests.md)}"
trl_version=$("$PYTHON" -c 'import trl; print(trl.__version__)')
TRL_REF="${TRL_REF:-v$trl_version}"
work="${TRL_TESTS_WORK:-$repo_root/outputs/trl_tests}/trl-$trl_version"
files="${TRL_TEST_FILES:-test_dpo_trainer.py test_reward_trainer.py test_grpo_trainer.py test_rloo_trainer.py test_sft_trainer.py}"
git_dir=$(git -C "$TRL_SRC" rev-parse --absolute-git-dir)
if ! git --git-dir="$git_dir" rev-parse -q --verify "$TRL_REF^{commit}" >/dev/null; then
  echo "TRL_REF $TRL_REF is not in $TRL_SRC; set TRL_REF to the nearest tag or commit (git -C \$TRL_SRC tag)" >&2
  exit 2
fi
rm -rf "$work/src" && mkdir -p "$work/src" "$work/hf_home"
git --git-dir="$git_dir" archive "$TRL_REF" tests scripts | tar -x -C "$work/src"
echo "TRL $trl_version, tests from $TRL_REF ($(git --git-dir="$git_dir" rev-parse --short "$TRL_REF^{commit}")) in $work/src" >&2
export HF_HOME="$work/hf_home" HF_HUB_CACHE="$work/hf_home/hub" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TRL_TESTS_SCRIPTS="$work/src/scripts" PYTHONPATH="$repo_root/scripts/trl_tests:$repo_root${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$HF_HUB_CACHE"
targets=()
for f in $files; do targets+=("tests/$f"); done
for mode in stock swapped; do
  flag=(); [ "$mode" = swapped ] && flag=(--swap)
  # TRL's tests fail stock too (models the machine cannot build): the exit code is the comparison's, not pytest's
  (cd "$work/src" && "$PYTHON" -m pytest -p plugin "${flag[@]}" "${targets[@]}" -q -p no:cacheprovider --continue-on-collection-errors \
     -o addopts="" --junitxml="$work/$mode.xml" "$@" >"$work/$mode.log" 2>&1) || true
  tail -n 1 "$work/$mode.log" >&2
done
"$PYTHON" "$repo_root/scripts/trl_tests/compare.py" "$work/stock.xml" "$work/swapped.xml" "$work/compare.md"
