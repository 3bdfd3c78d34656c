#!/usr/bin/env bash
# lmms-eval (model llava_hf) on a LLaVA-NeXT checkpoint, in a venv of its own.
#
#   bash scripts/eval/lmms_eval.sh MODEL_DIR [TASKS]        (or: make lmms-eval MODEL_DIR=... TASKS=...)
#
# Without TASKS: a local lmms-eval task built at run time from the embedded held-out split
# (playground/embedded/LLaVA-NeXT-Data/eval/, or DATA_PATH / IMAGE_FOLDER), scored as
# `python -m llava.eval` scores it; prints one JSON line with the accuracy (python -m llava.lmms_task).
# With TASKS (comma separated, e.g. mme,gqa): those lmms-eval tasks as they are, for real checkpoints
# (their data come from the Hugging Face hub).
#
# Environment: DEVICE (cpu|cuda, default cuda when available), LIMIT (first N records), OUTPUT_PATH
# (lmms-eval's logs, default logs/lmms_eval/<model>), PREDICTIONS (local task: per-record JSON lines),
# LMMS_EVAL_VENV (default .venv-lmms-eval), TORCH_SPEC (default torch==2.13.0, the CPU build on CPU
# machines; pass your CUDA build on a GPU machine).
#
# The venv holds torch (TORCH_SPEC), lmms-eval 0.7.3 with its dependencies, decord (imported by
# llava_hf), filelock<4 (lmms-eval 0.7.3 patches filelock._api, gone in filelock 4), this package
# (-e, --no-deps) and its runtime and test dependencies. torchvision is removed when it does not import
# (PyPI's wheel is built for CUDA torch and breaks every transformers model import next to the CPU
# build); transformers then uses its PIL image processors. Every install is held to the exact
# versions of locks/lmms-eval.txt (LMMS_EVAL_LOCK; "latest" for none); LMMS_EVAL_WRITE_LOCK=FILE writes
# the versions the venv ended with (`make lock` does, with latest); LMMS_EVAL_SETUP_ONLY=1 stops after
# the setup. Setup is skipped when the venv was set up from the same lock, TORCH_SPEC and script. A
# checkpoint saved with --save_format compressed is evaluated through its dense copy
# (scripts/lib/dense_copy.sh).
set -euo pipefail

LMMS_EVAL_SPEC="lmms-eval==0.7.3"
# torch builds differ per machine (CPU, CUDA versions): never locked
UNLOCKED='^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+)=='

abs() { case "$1" in /*|"") printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
MODEL_DIR="$(abs "${1:-}")"
TASKS="${2:-}"
# relative paths are the caller's, not the repository root's
for var in DATA_PATH IMAGE_FOLDER OUTPUT_PATH PREDICTIONS LMMS_EVAL_WRITE_LOCK LMMS_EVAL_VENV; do
    if [ -n "${!var:-}" ]; then printf -v "$var" '%s' "$(abs "${!var}")"; fi
done
if [ -n "${LMMS_EVAL_LOCK:-}" ] && [ "$LMMS_EVAL_LOCK" != latest ]; then LMMS_EVAL_LOCK="$(abs "$LMMS_EVAL_LOCK")"; fi
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [ "${LMMS_EVAL_SETUP_ONLY:-0}" != 1 ] && [ -z "$MODEL_DIR" ]; then
    echo "usage: bash scripts/eval/lmms_eval.sh MODEL_DIR [TASKS]" >&2
    exit 2
fi
if [ -n "$MODEL_DIR" ] && [ ! -f "$MODEL_DIR/config.json" ]; then
    echo "error: $MODEL_DIR is not a llava-hf checkpoint directory (no config.json)" >&2
    exit 2
fi

VENV="${LMMS_EVAL_VENV:-$PWD/.venv-lmms-eval}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
LOCK="${LMMS_EVAL_LOCK:-locks/lmms-eval.txt}"
PY="$VENV/bin/python"
if [ "$LOCK" != latest ] && [ ! -f "$LOCK" ]; then
    echo "error: lock file $LOCK not found (make lock writes it; LMMS_EVAL_LOCK=latest installs without one)" >&2
    exit 2
fi

STAMP="$VENV/.mmprune-lmms-eval"
want_stamp() {
    { echo "$TORCH_SPEC $LMMS_EVAL_SPEC"; cat "${BASH_SOURCE[0]}"; [ "$LOCK" = latest ] && echo latest || cat "$LOCK"; } \
        | sha256sum | cut -d' ' -f1
}

setup() {
    local log constraints start
    start=$SECONDS
    log="$(mktemp)"
    constraints="$(mktemp)"
    # pip's output goes to a log shown only when a step fails
    pip_install() {
        "$PY" -m pip install --disable-pip-version-check -c "$constraints" "$@" >"$log" 2>&1 || {
            cat "$log" >&2
            echo "error: pip install $* failed in $VENV (full log above)" >&2
            rm -f "$log" "$constraints"
            exit 1
        }
    }
    echo "setting up $VENV ($LMMS_EVAL_SPEC, $TORCH_SPEC, $([ "$LOCK" = latest ] && echo "newest releases" || echo "versions of $LOCK"))" >&2
    [ -x "$PY" ] || python3 -m venv "$VENV"
    rm -f "$STAMP"
    if [ "$LOCK" != latest ]; then grep -vE "$UNLOCKED" "$LOCK" >"$constraints"; else : >"$constraints"; fi
    pip_install --upgrade pip setuptools wheel  # the package is built without isolation
    pip_install "$TORCH_SPEC"
    # the torch now installed stays for every later step (no resolver may swap in another build)
    "$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >>"$constraints"
    # decord: llava_hf imports it at the top; filelock<4: lmms-eval 0.7.3 imports filelock._api
    pip_install "$LMMS_EVAL_SPEC" "decord>=0.6,<0.7" "filelock<4"
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
    if ! "$PY" -c 'import torchvision' >/dev/null 2>&1; then
        echo "torchvision does not import next to torch $("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))') (a build for another torch); removing it" >&2
        "$PY" -m pip uninstall --quiet -y torchvision torchaudio >/dev/null 2>&1 || true
    fi
    OMP_NUM_THREADS=1 "$PY" -c 'from transformers import LlavaNextForConditionalGeneration; import lmms_eval.models.simple.llava_hf, decord' \
        || { echo "error: the lmms-eval venv $VENV cannot import llava_hf (see above)" >&2; exit 1; }
    # lmms-eval and timm list torchvision; decord's wheel tag is older than pip's platform check
    "$PY" -m pip check 2>&1 | grep -vE 'requires torchvision|decord .* is not supported' >&2 || true
    rm -f "$log" "$constraints"
    want_stamp >"$STAMP"
    echo "set up $VENV in $((SECONDS - start)) s" >&2
}

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$(want_stamp)" ]; then
    setup
fi

if [ -n "${LMMS_EVAL_WRITE_LOCK:-}" ]; then
    {
        echo "# Exact versions of the lmms-eval venv (scripts/eval/lmms_eval.sh; pip constraints file)."
        echo "# Written by \`make lock\` on $(date -u +%F) with $("$PY" -V), $(uname -m)."
        echo "# torch, torchvision, triton and nvidia-* are not here: TORCH_SPEC chooses the build."
        "$PY" -m pip freeze --all --exclude-editable | grep -viE "$UNLOCKED"
    } >"$LMMS_EVAL_WRITE_LOCK.tmp"
    mv "$LMMS_EVAL_WRITE_LOCK.tmp" "$LMMS_EVAL_WRITE_LOCK"
    echo "wrote $LMMS_EVAL_WRITE_LOCK" >&2
fi
[ "${LMMS_EVAL_SETUP_ONLY:-0}" = 1 ] && exit 0

# a --save_format compressed checkpoint is read through its dense copy (scripts/lib/dense_copy.sh)
source scripts/lib/dense_copy.sh
dense_model_dir "$MODEL_DIR"
ARGS=(--model_path "$DENSE_MODEL_DIR")
[ -n "$TASKS" ] && ARGS+=(--tasks "$TASKS")
[ -n "${DATA_PATH:-}" ] && ARGS+=(--data_path "$DATA_PATH")
[ -n "${IMAGE_FOLDER:-}" ] && ARGS+=(--image_folder "$IMAGE_FOLDER")
[ -n "${DEVICE:-}" ] && ARGS+=(--device "$DEVICE")
[ -n "${LIMIT:-}" ] && ARGS+=(--limit "$LIMIT")
[ -n "${OUTPUT_PATH:-}" ] && ARGS+=(--output_path "$OUTPUT_PATH")
[ -n "${PREDICTIONS:-}" ] && ARGS+=(--predictions "$PREDICTIONS")
if [ -z "$DENSE_TMP" ]; then exec "$PY" -m llava.lmms_task "${ARGS[@]}"; fi
status=0
"$PY" -m llava.lmms_task "${ARGS[@]}" || status=$?
rm -rf "$DENSE_TMP"
exit "$status"
