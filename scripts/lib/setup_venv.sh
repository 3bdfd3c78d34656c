#!/usr/bin/env bash
# Create (or bring up to date) a virtual environment holding this package.
#
#   bash scripts/lib/setup_venv.sh VENV EXTRAS LOCK      exact versions from the lock (make setup, CI)
#   bash scripts/lib/setup_venv.sh VENV EXTRAS latest    the newest releases pyproject.toml allows
#
# torch comes from TORCH_SPEC (default torch==2.13.0, the CPU build on CPU machines) and is not in
# the lock: a GPU machine brings its own CUDA build. pip, setuptools and wheel are locked too, and the
# package is built without isolation so that no unpinned build tool is fetched.
set -euo pipefail

VENV="$1"
EXTRAS="$2"
LOCK="$3"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

if [ "$LOCK" = latest ]; then
    PINS=(--upgrade --upgrade-strategy eager)
else
    [ -f "$LOCK" ] || { echo "error: lock file $LOCK not found (make lock writes it)" >&2; exit 2; }
    PINS=(-c "$LOCK")
fi
PY="$VENV/bin/python"
[ -x "$PY" ] || python3 -m venv "$VENV"
"$PY" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" --upgrade pip setuptools wheel
"$PY" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" "$TORCH_SPEC"
"$PY" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" --no-build-isolation -e ".[$EXTRAS]"
