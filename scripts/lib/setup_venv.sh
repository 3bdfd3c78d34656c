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
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
# pip's output goes to a log shown only when a step fails (the build tools' warnings are noise)
pip_install() {
    "$PY" -m pip install --disable-pip-version-check "${PINS[@]}" "$@" >"$LOG" 2>&1 || {
        cat "$LOG" >&2
        echo "error: pip install $* failed in $VENV (full log above)" >&2
        exit 1
    }
}
echo "setting up $VENV ($([ "$LOCK" = latest ] && echo "newest allowed releases" || echo "versions of $LOCK"), $TORCH_SPEC)"
[ -x "$PY" ] || python3 -m venv "$VENV"
pip_install --upgrade pip setuptools wheel
pip_install "$TORCH_SPEC"
pip_install --no-build-isolation -e ".[$EXTRAS]"
