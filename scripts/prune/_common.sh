#!/usr/bin/env bash
# Shared by scripts/prune/<method>.sh: positional [SPARSITY=0.5] [unstructured|2:4|4:8], then any
# extra flags for `python -m llava.pruners`. Environment overrides: MODEL_PATH, DATA_PATH,
# IMAGE_FOLDER, TASK_SPLIT, TASK_NAME, OUTPUT_DIR, NSAMPLES, SEED, DEVICE, OVERWRITE=1, PYTHON, and
# for models larger than one device DEVICE_MAP, MAX_MEMORY, OFFLOAD_FOLDER (docs/memory-plan.md).
# The allocation cap defaults to SPARSITY + 0.1 as in the public scripts.
# Unset paths fall back to the README's real paths, or to the embedded default when those are absent.
source "$(dirname "${BASH_SOURCE[0]}")/../lib/prune_common.sh"

prune_main() {
  local method="$1"; shift
  prune_setup "$@"
  local args=(--method "$method" "${COMMON_ARGS[@]}" --task_name "${TASK_NAME:-sharegpt4v}"
              --vit_sparsity_ratio 0)
  if [ -n "${IMAGE_FOLDER:-}" ]; then args+=(--image_folder "$IMAGE_FOLDER"); fi
  if [ -n "${TASK_SPLIT:-}" ]; then args+=(--task_split_path "$TASK_SPLIT"); fi
  echo "[$method] sparsity $SPARSITY_ARG ($TYPE_ARG)" >&2
  exec "$PY" -m llava.pruners "${args[@]}" "${REST_ARGS[@]}"
}
