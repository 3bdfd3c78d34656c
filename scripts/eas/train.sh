#!/usr/bin/env bash
# Usage: bash scripts/eas/train.sh [K=0.5] [extra `python -m llava.eas` flags]
# K: attention blocks to skip, a count (e.g. 12) or a fraction of the blocks (0.5 = half).
# Searches the skip set, trains the PIA adapters, saves the EAS model to OUTPUT_DIR.
# Environment overrides: MODEL_PATH, DATA_PATH, IMAGE_FOLDER, TASK_SPLIT, TASK_NAME, OUTPUT_DIR,
# SEED, DEVICE, OVERWRITE=1, PYTHON. Unset paths fall back to the README's real paths, or to the
# embedded default (EMBEDDED_MODEL: smol or tiny; synthetic VQA) when those are absent (a banner says so).
# An existing OUTPUT_DIR is refused unless OVERWRITE=1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../lib/paths.sh"
absolutize_env MODEL_PATH DATA_PATH IMAGE_FOLDER TASK_SPLIT OUTPUT_DIR  # the caller's relative paths
enter_repo "$@"
set -- "${ABS_ARGS[@]}"

k=0.5
k_args=()  # K goes to python only when given: with --skip_layers it must agree with them
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then k="$1"; k_args=(--k "$k"); shift; fi
case "$k" in
  ''|*[!0-9.]*) echo "error: K '$k' is not a number (a count of blocks or a fraction like 0.5)" >&2; exit 2 ;;
esac
model_name="$(basename "${MODEL_PATH:-checkpoints/llama3-llava-next-8b}")"
[ -d "${MODEL_PATH:-checkpoints/llama3-llava-next-8b}" ] || model_name="llava-next-${EMBEDDED_MODEL:-smol}"
args=("${k_args[@]}" --seed "${SEED:-0}" --output_dir "${OUTPUT_DIR:-checkpoints/${model_name}_eas_k${k}}")
if [ -n "${MODEL_PATH:-}" ]; then args+=(--model_path "$MODEL_PATH"); fi
if [ -n "${DATA_PATH:-}" ]; then args+=(--data_path "$DATA_PATH"); fi
if [ -n "${IMAGE_FOLDER:-}" ]; then args+=(--image_folder "$IMAGE_FOLDER"); fi
if [ -n "${TASK_SPLIT:-}" ]; then args+=(--task_split_path "$TASK_SPLIT"); fi
if [ -n "${TASK_NAME:-}" ]; then args+=(--task_name "$TASK_NAME"); fi
if [ -n "${DEVICE:-}" ]; then args+=(--device "$DEVICE"); fi
if [ "${OVERWRITE:-0}" = "1" ]; then args+=(--overwrite); fi
echo "[eas] skip K=$k attention blocks" >&2
exec "$PY" -m llava.eas "${args[@]}" "$@"
