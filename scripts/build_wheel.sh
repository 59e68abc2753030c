#!/usr/bin/env bash
# Build the wheel into dist/ (replacing an older one) and check that it holds the library only: every file under
# trl_regularizers/ (no demo, no checkpoints, no tests). Prints the wheel's path and size.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] && python=.venv/bin/python
rm -rf dist build
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w dist . >/dev/null
wheel=$(ls dist/trl_regularizers-*.whl)
"$python" - "$wheel" <<'PY'
import sys, zipfile
path = sys.argv[1]
names = zipfile.ZipFile(path).namelist()
library = [n for n in names if not n.startswith("trl_regularizers-")]  # the .dist-info folder is metadata
stray = [n for n in library if not n.startswith("trl_regularizers/") or not n.endswith(".py")]
if stray:
    sys.exit(f"{path} holds more than the library: {stray[:10]}")
import os
print(f"{path}: {len(library)} modules, {os.path.getsize(path) / 1024:.0f} KiB")
PY
