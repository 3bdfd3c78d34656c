#!/usr/bin/env bash
# Usage: bash scripts/fitprune/search.sh [BUDGET=0.5] [extra python -m llava.fitprune flags]
# Writes a FitPrune token recipe (fraction of visual tokens kept after each decoder layer) fitted to
# remove BUDGET of the visual tokens' decoder FLOPs. Environment overrides: MODEL_PATH, DATA_PATH,
# IMAGE_FOLDER, TASK_SPLIT, TASK_NAME, OUTPUT (recipe JSON), NSAMPLES (66), SEED (42), DEVICE,
# OVERWRITE=1, PYTHON. Unset paths fall back to the README's real paths, or to the embedded default
# when those are absent (a banner says so). Evaluate with:
#   python -m llava.eval --model_path MODEL --token_recipe OUTPUT
set -euo pipefail
budget=0.5
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then budget="$1"; shift; fi
source "$(dirname "${BASH_SOURCE[0]}")/../lib/paths.sh"
absolutize_env MODEL_PATH DATA_PATH IMAGE_FOLDER TASK_SPLIT OUTPUT  # the caller's relative paths
enter_repo "$@"
set -- "${ABS_ARGS[@]}"
args=(--budget "$budget" --seed "${SEED:-42}" --nsamples "${NSAMPLES:-66}" --task_name "${TASK_NAME:-sharegpt4v}")
if [ -n "${MODEL_PATH:-}" ]; then args+=(--model_path "$MODEL_PATH"); fi
if [ -n "${DATA_PATH:-}" ]; then args+=(--data_path "$DATA_PATH"); fi
if [ -n "${IMAGE_FOLDER:-}" ]; then args+=(--image_folder "$IMAGE_FOLDER"); fi
if [ -n "${TASK_SPLIT:-}" ]; then args+=(--task_split_path "$TASK_SPLIT"); fi
if [ -n "${OUTPUT:-}" ]; then args+=(--output "$OUTPUT"); fi
if [ -n "${DEVICE:-}" ]; then args+=(--device "$DEVICE"); fi
if [ "${OVERWRITE:-0}" = "1" ]; then args+=(--overwrite); fi
echo "[fitprune] FLOPs budget $budget" >&2
exec "$PY" -m llava.fitprune "${args[@]}" "$@"
