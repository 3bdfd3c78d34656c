#!/usr/bin/env bash
# Cross-check of our Wanda and SparseGPT against llm-compressor (tests/peer), in a venv of its own:
# llmcompressor 0.14.0.1 pins transformers 5.15-5.17, while the project's .venv may hold a newer one.
#
#   bash tests/peer/run_peer_tests.sh [VENV]        (from the repository root; VENV default .venv-peer)
#
# Creates VENV if missing, installs torch first (TORCH_SPEC, default torch==2.13.0: the CPU build on
# CPU machines, as in the Makefile), then llmcompressor==0.14.0.1 (brings transformers 5.17), then
# this package (-e .[test] --no-deps) and those of its runtime dependencies that are missing, and
# runs `python -m pytest -q tests/peer` (on OMP_NUM_THREADS threads, default 1). If llmcompressor
# cannot be installed it says why in one line and runs pytest anyway, which then reports the test
# as skipped. Exit status: pytest's.
# Every install is held to the exact versions of locks/peer.txt (PEER_LOCK; "latest" for none);
# PEER_WRITE_LOCK=FILE writes the versions this venv ended with (`make lock` does, with latest).
set -u

VENV="${1:-.venv-peer}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
LLMCOMPRESSOR_SPEC="llmcompressor==0.14.0.1"

case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1
PY="$VENV/bin/python"
LOG="$(mktemp)"
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$LOG" "$CONSTRAINTS"' EXIT

# the last error line pip wrote, for one-line reasons
reason() { grep -E '^ERROR|error:' "$LOG" | tail -n 1 | cut -c 1-200; }

if [ ! -x "$PY" ]; then
    source scripts/lib/disk_room.sh
    make_room_for_venv "$VENV" 2600 "$ROOT"  # the venv is 1.6 GB
    python3 -m venv "$VENV" || { echo "peer tests: cannot create the venv $VENV"; exit 1; }
fi
"$PY" -m pip install --quiet --upgrade pip >"$LOG" 2>&1 || true

# torch first, then pinned (constraints) for every later step so that none swaps in another build
if ! "$PY" -m pip install --quiet "$TORCH_SPEC" >"$LOG" 2>&1; then
    echo "peer tests: $TORCH_SPEC could not be installed ($(reason)); the test will be skipped"
fi
"$PY" -c 'import torch; print(f"torch=={torch.__version__}")' >"$CONSTRAINTS" 2>/dev/null || : >"$CONSTRAINTS"
PEER_LOCK="${PEER_LOCK:-locks/peer.txt}"
if [ "$PEER_LOCK" != latest ]; then
    [ -f "$PEER_LOCK" ] || { echo "peer tests: lock file $PEER_LOCK not found (make lock writes it)"; exit 1; }
    grep -viE '^(torch|nvidia-[a-z0-9-]+|triton)==' "$PEER_LOCK" >>"$CONSTRAINTS"
fi

PEER=1
if ! "$PY" -m pip install --quiet -c "$CONSTRAINTS" "$LLMCOMPRESSOR_SPEC" >"$LOG" 2>&1; then
    echo "peer tests: $LLMCOMPRESSOR_SPEC could not be installed ($(reason)); the test will be skipped"
    PEER=0
fi
# keep the transformers that llmcompressor brought while our dependencies are added
if [ "$PEER_LOCK" = latest ]; then
    "$PY" -c 'import importlib.metadata as m; print("transformers==" + m.version("transformers"))' \
        >>"$CONSTRAINTS" 2>/dev/null || true
fi

"$PY" -m pip install --quiet --no-deps -e ".[test]" >"$LOG" 2>&1 \
    || { echo "peer tests: cannot install this package ($(reason))"; cat "$LOG"; exit 1; }

if [ "$PEER" = 1 ]; then
    # runtime and test dependencies from pyproject.toml; pip leaves the satisfied ones alone
    DEPS="$("$PY" - <<'PYEOF'
import re

try:
    import tomllib

    with open("pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["test"]
except ImportError:  # Python 3.10: read the two arrays by hand
    text = open("pyproject.toml").read()
    deps = []
    for key in ("dependencies", "test"):
        block = re.search(r"^%s = \[(.*?)\]" % key, text, re.S | re.M).group(1)
        deps += re.findall(r'"([^"]+)"', block)
print("\n".join(deps))
PYEOF
)" || { echo "peer tests: cannot read the dependencies from pyproject.toml"; exit 1; }
    mapfile -t DEP_LIST <<<"$DEPS"
else
    DEP_LIST=("pytest>=8.0")  # enough to report the skip
fi
"$PY" -m pip install --quiet -c "$CONSTRAINTS" "${DEP_LIST[@]}" >"$LOG" 2>&1 \
    || { echo "peer tests: cannot install the test dependencies ($(reason))"; cat "$LOG"; exit 1; }

if [ -n "${PEER_WRITE_LOCK:-}" ]; then
    {
        echo "# Exact versions of the llm-compressor cross-check venv (tests/peer/run_peer_tests.sh)."
        echo "# Written by \`make lock\` on $(date -u +%F) with $("$PY" -V), $(uname -m); torch: TORCH_SPEC."
        "$PY" -m pip freeze --all --exclude-editable | grep -viE '^(torch|nvidia-[a-z0-9-]+|triton)=='
    } >"$PEER_WRITE_LOCK.tmp" && mv "$PEER_WRITE_LOCK.tmp" "$PEER_WRITE_LOCK" \
        && echo "wrote $PEER_WRITE_LOCK"
fi

# PEER_SETUP_ONLY=1: build the venv and stop (`make bench` runs its peer side there)
[ "${PEER_SETUP_ONLY:-0}" = 1 ] && exit 0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# one thread unless OMP_NUM_THREADS says otherwise (the tiny model's ops are too small to split);
# the module runs every computation, ours included, on that count
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" -m pytest -q tests/peer
