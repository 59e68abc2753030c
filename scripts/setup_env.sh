#!/usr/bin/env bash
# Create (or reuse) a test environment.
#   scripts/setup_env.sh latest   -> .venv        (newest supported TRL, or TRL_LATEST; extras dev, peft)
#   scripts/setup_env.sh trl112   -> .venv-trl112 (TRL 1.12, the [ppo] extra)
#   scripts/setup_env.sh deps     -> .venv-deps   (the built wheel and its declared dependencies only, no extras)
#   scripts/setup_env.sh 1.13.0   -> .venv-trl/1.13.0: that TRL wheel alone, without its dependencies, to be put
#                                    first on PYTHONPATH over .venv (scripts/test.sh). Correct because every
#                                    requirement of a TRL 1.12-1.16 release is one of TRL 1.16's, with a lower or
#                                    equal bound; .venv-deps checks each release with its own requirements.
# TORCH_SPEC overrides the torch requirement (default: the CPU build torch==2.13.0;
# set e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
flavor="${1:-latest}"
pip_flags=(--quiet --disable-pip-version-check --progress-bar off)
case "$flavor" in
  latest) venv=.venv;        extras="[dev,peft]" ;;
  trl112) venv=.venv-trl112; extras="[dev,peft,ppo]" ;;
  deps)   venv=.venv-deps;   extras="" ;;
  [0-9]*.*.*)
    bash "$0" latest
    overlay=".venv-trl/$flavor"
    if [ ! -d "$overlay" ]; then
      # Install into a temporary folder first, so an interrupted install is never taken for a finished one.
      rm -rf "$overlay.tmp"
      .venv/bin/python -m pip install "${pip_flags[@]}" --no-deps --target "$overlay.tmp" "trl==$flavor"
      mv "$overlay.tmp" "$overlay"
    fi
    exit 0 ;;
  *) echo "unknown environment '$flavor' (expected: latest, trl112, deps or a TRL version such as 1.13.0)" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
trl_pin=""
[ "$flavor" = latest ] && [ -n "${TRL_LATEST:-}" ] && trl_pin="trl==$TRL_LATEST"
stamp="$venv/.installed-$( (cat pyproject.toml scripts/setup_env.sh; echo "$trl_pin") | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  echo "$venv is up to date" >&2
  exit 0
fi
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
pip=("$venv/bin/python" -m pip install "${pip_flags[@]}")
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# shellcheck disable=SC2086
"${pip[@]}" $TORCH_SPEC
if [ "$flavor" = deps ]; then
  # the built wheel, as a user installs it (not editable): scripts/test.sh reinstalls the current one before each run
  bash scripts/build_wheel.sh >/dev/null
  "${pip[@]}" dist/trl_regularizers-*.whl
else
  # shellcheck disable=SC2086
  "${pip[@]}" -e ".${extras}" $trl_pin
fi
rm -f "$venv"/.installed-*
touch "$stamp"
echo "$venv ready: $("$venv/bin/python" -c 'import torch, trl, transformers; print("torch", torch.__version__, "trl", trl.__version__, "transformers", transformers.__version__)')" >&2
