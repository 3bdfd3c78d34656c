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
# the setup. Setup is skipped when the venv was set up from the same lock, TORCH_SPEC and scripts (this
# one and scripts/lib/side_venv.sh, which holds the steps both side venvs share). A checkpoint saved
# with --save_format compressed is evaluated through its dense copy (scripts/lib/dense_copy.sh).
set -euo pipefail

LMMS_EVAL_SPEC="lmms-eval==0.7.3"
# torch builds differ per machine (CPU, CUDA versions): never locked
UNLOCKED='^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+)=='

source "$(dirname "${BASH_SOURCE[0]}")/../lib/side_venv.sh"
MODEL_DIR="${1:-}"
TASKS="${2:-}"
# relative paths are the caller's, not the repository root's
side_venv_abs_paths LMMS_EVAL_LOCK MODEL_DIR DATA_PATH IMAGE_FOLDER OUTPUT_PATH PREDICTIONS LMMS_EVAL_WRITE_LOCK \
    LMMS_EVAL_VENV
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

VENV="${LMMS_EVAL_VENV:-$PWD/.venv-lmms-eval}"
LOCK="${LMMS_EVAL_LOCK:-locks/lmms-eval.txt}"
STAMP="$VENV/.mmprune-lmms-eval"
SIDE_VENV_MB=3500  # the venv is 2.5 GB; its tests write checkpoints too
side_venv_init "${LMMS_EVAL_SETUP_ONLY:-0}" LMMS_EVAL_LOCK "usage: bash scripts/eval/lmms_eval.sh MODEL_DIR [TASKS]"

side_packages() {
    # decord: llava_hf imports it at the top; filelock<4: lmms-eval 0.7.3 imports filelock._api
    pip_install "$LMMS_EVAL_SPEC" "decord>=0.6,<0.7" "filelock<4"
}

side_checks() {
    if ! "$PY" -c 'import torchvision' >/dev/null 2>&1; then
        echo "torchvision does not import next to torch $("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))') (a build for another torch); removing it" >&2
        "$PY" -m pip uninstall --quiet -y torchvision torchaudio >/dev/null 2>&1 || true
    fi
    OMP_NUM_THREADS=1 "$PY" -c 'from transformers import LlavaNextForConditionalGeneration; import lmms_eval.models.simple.llava_hf, decord' \
        || { echo "error: the lmms-eval venv $VENV cannot import llava_hf (see above)" >&2; exit 1; }
    # lmms-eval and timm list torchvision; decord's wheel tag is older than pip's platform check
    "$PY" -m pip check 2>&1 | grep -vE 'requires torchvision|decord .* is not supported' >&2 || true
}

side_venv_ensure "$LMMS_EVAL_SPEC" "$TORCH_SPEC $LMMS_EVAL_SPEC" scripts/eval/lmms_eval.sh
side_venv_write_lock "${LMMS_EVAL_WRITE_LOCK:-}" \
    "Exact versions of the lmms-eval venv (scripts/eval/lmms_eval.sh; pip constraints file)." \
    "torch, torchvision, triton and nvidia-* are not here: TORCH_SPEC chooses the build."
[ "${LMMS_EVAL_SETUP_ONLY:-0}" = 1 ] && exit 0

ARGS=()
[ -n "$TASKS" ] && ARGS+=(--tasks "$TASKS")
[ -n "${DATA_PATH:-}" ] && ARGS+=(--data_path "$DATA_PATH")
[ -n "${IMAGE_FOLDER:-}" ] && ARGS+=(--image_folder "$IMAGE_FOLDER")
[ -n "${DEVICE:-}" ] && ARGS+=(--device "$DEVICE")
[ -n "${LIMIT:-}" ] && ARGS+=(--limit "$LIMIT")
[ -n "${OUTPUT_PATH:-}" ] && ARGS+=(--output_path "$OUTPUT_PATH")
[ -n "${PREDICTIONS:-}" ] && ARGS+=(--predictions "$PREDICTIONS")
# a --save_format compressed checkpoint is read through its dense copy (scripts/lib/dense_copy.sh)
side_venv_run llava.lmms_task "${ARGS[@]}"
