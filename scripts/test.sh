#!/usr/bin/env bash
# Run the tests on every TRL release the package supports: each final release the registry serves that pyproject.toml's
# requirement (trl>=1.12,!=1.15.0, no upper bound) allows (scripts/trl_releases.py):
#   latest   .venv, the newest release: the whole suite
#   trl112   .venv-trl112, TRL 1.12 (the [ppo] extra): the whole suite but core/, the end-to-end demo and the notebooks
#   <X.Y.Z>  each release between, in .venv with that TRL wheel first on PYTHONPATH: the newest patch of each minor
#            the trainer, ptx, config and TRL-contract tests (core/ is pure torch: tested once, on the latest); an
#            older patch the TRL contract, the drop-in tests and every parity test against stock TRL ("stock")
#   deps     .venv-deps, the built wheel (the library only) with its declared dependencies: each release is installed
#            in turn (with TRL's own requirements) and the trainers must import
# A release newer than the newest one tested (trainers/adapters/contract.py NEWEST_TESTED_TRL) runs like any other:
# its failures show what moved. Environments are created on first use (scripts/setup_env.sh). Extra arguments go to
# pytest and replace the default selection in every environment. TRL_ENVS picks environments, e.g. TRL_ENVS="latest 1.13.0".
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mapfile -t declared < <(python3 scripts/trl_releases.py)
export TRL_LATEST="${declared[-1]}"
between=()
declare -A newest_patch  # minor -> its newest declared patch (the list is sorted)
for version in "${declared[@]}"; do
  case "$version" in 1.12.* | "$TRL_LATEST") ;; *) between+=("$version") ;; esac
  newest_patch[${version%.*}]=$version
done
echo "== TRL releases: ${declared[*]} (whole suite on 1.12 and $TRL_LATEST)"
newest_patch_tests=(tests/trainers tests/test_configs.py tests/test_ptx.py tests/test_trl_contract.py tests/test_dataset_checks.py)
older_patch_tests=(tests/test_trl_contract.py tests/trainers -k "stock or contract or drop_in")
import_check='
import trl
from trl import DPOTrainer, GRPOTrainer, RLOOTrainer, RewardTrainer, SFTTrainer
from trl_regularizers import (KLDriftCallback, RegularizedDPOTrainer, RegularizedGRPOTrainer, RegularizedPPOTrainer,
                              RegularizedRewardTrainer, RegularizedRLOOTrainer, RegularizedSFTTrainer)
import trl_regularizers
assert "site-packages" in trl_regularizers.__file__, trl_regularizers.__file__  # the installed wheel, not the checkout
print("TRL", trl.__version__, "imports with the declared dependencies only")'
failed=()
for env in ${TRL_ENVS:-latest trl112 ${between[*]} deps}; do
  bash scripts/setup_env.sh "$env"
  case "$env" in
    latest | trl112)
      venv=.venv; [ "$env" = trl112 ] && venv=.venv-trl112
      echo "== tests in $venv ($("$venv/bin/python" -c 'import trl; print("TRL", trl.__version__)'))"
      # core/ is pure torch (tests/core/test_isolation.py), and the demo and the notebooks are run on the newest TRL:
      # once is enough
      if [ $# -gt 0 ]; then args=("$@")
      elif [ "$env" = trl112 ]; then args=(--ignore=tests/core --ignore=tests/test_demo.py --ignore=tests/test_notebooks.py)
      else args=(); fi
      "$venv/bin/python" -m pytest "${args[@]}" || failed+=("$venv") ;;
    deps)
      # The wheel as built now (the library only: scripts/build_wheel.sh checks its files), installed as a user would.
      bash scripts/build_wheel.sh || failed+=("the wheel")
      .venv-deps/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall dist/trl_regularizers-*.whl
      # One environment for all: every requirement of these releases is also one of torch, transformers,
      # accelerate or datasets, so no release relies on a package that only another release brought in.
      for version in "${declared[@]}"; do
        echo "== .venv-deps with TRL $version"
        { .venv-deps/bin/python -m pip install --quiet --disable-pip-version-check "trl==$version" \
          && .venv-deps/bin/python -I -c "$import_check"; } || failed+=(".venv-deps (TRL $version)")
      done ;;
    *)
      # Absolute, since some tests start subprocesses in other folders.
      export PYTHONPATH="$PWD/.venv-trl/$env"
      echo "== tests in .venv with $(.venv/bin/python -c 'import trl; print("TRL", trl.__version__, "from", trl.__path__[0])')"
      if [ $# -gt 0 ]; then args=("$@")
      elif [ "${newest_patch[${env%.*}]}" = "$env" ]; then args=("${newest_patch_tests[@]}")
      else args=("${older_patch_tests[@]}"); fi
      .venv/bin/python -m pytest "${args[@]}" || failed+=("TRL $env")
      unset PYTHONPATH ;;
  esac
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED in: ${failed[*]}" >&2
  exit 1
fi
