#!/usr/bin/env bash
# The README's first command: build (or reuse) the latest-TRL venv, then run the offline demo.
#   bash scripts/demo.sh                 -> reports/demo/report.md (+ PNG plots), < 10 min on 2 CPU cores
#   bash scripts/demo.sh --full          -> the whole over-optimization study, 3 seeds (27 min with --seeds 5)
#   bash scripts/demo.sh --quick         -> CI-sized run
# Extra arguments go to `python -m examples.demo` (e.g. --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
TRL_LATEST="$(python3 scripts/trl_releases.py | tail -n 1)" bash scripts/setup_env.sh latest  # the TRL scripts/test.sh tests
exec .venv/bin/python -m examples.demo --out reports/demo "$@"
