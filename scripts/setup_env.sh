#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the package installed.
#   scripts/setup_env.sh latest   -> .venv        (newest supported TRL)
#   scripts/setup_env.sh trl112   -> .venv-trl112 (TRL 1.12, the [ppo] extra)
# TORCH_SPEC overrides the torch requirement (default: the CPU build torch==2.13.0;
# set e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
flavor="${1:-latest}"
case "$flavor" in
  latest) venv=.venv;        extras="dev,peft" ;;
  trl112) venv=.venv-trl112; extras="dev,peft,ppo" ;;
  *) echo "unknown environment '$flavor' (expected: latest, trl112)" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
stamp="$venv/.installed-$(cat pyproject.toml scripts/setup_env.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  echo "$venv is up to date" >&2
  exit 0
fi
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --progress-bar off)
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# shellcheck disable=SC2086
"${pip[@]}" $TORCH_SPEC
"${pip[@]}" -e ".[${extras}]"
rm -f "$venv"/.installed-*
touch "$stamp"
echo "$venv ready: $("$venv/bin/python" -c 'import torch, trl, transformers; print("torch", torch.__version__, "trl", trl.__version__, "transformers", transformers.__version__)')" >&2
