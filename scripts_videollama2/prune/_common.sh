#!/usr/bin/env bash
# Shared by scripts_videollama2/prune/<method>.sh: positional [SPARSITY=0.5] [unstructured|2:4|4:8],
# then any extra flags for `python -m videollama2.pruners` (flags may also come first:
# `tamp.sh --no_eval` keeps the default sparsity). Environment overrides: MODEL_PATH,
# DATA_PATH, DATA_FOLDER, OUTPUT_DIR, NSAMPLES, SEED, DEVICE, VIT_SPARSITY, AUD_SPARSITY,
# OVERWRITE=1, PYTHON, and for models larger than one device DEVICE_MAP, MAX_MEMORY, OFFLOAD_FOLDER
# (docs/memory-plan.md). The allocation cap defaults to SPARSITY + 0.1 as in the public scripts.
# Unset paths fall back to the public scripts' real paths (checkpoints/VideoLLaMA2.1-7B-AV,
# datasets/avinstruct_avqa_music.json, datasets/AVQA_music), or to the embedded default when
# those are absent.
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/lib/prune_common.sh"

prune_main() {
  local method="$1"; shift
  prune_setup "$@"
  local args=(--method "$method" "${COMMON_ARGS[@]}"
              --vit_sparsity_ratio "${VIT_SPARSITY:-0}" --aud_sparsity_ratio "${AUD_SPARSITY:-0}")
  if [ -n "${DATA_FOLDER:-}" ]; then args+=(--data_folder "$DATA_FOLDER"); fi
  echo "[$method] sparsity $SPARSITY_ARG ($TYPE_ARG)" >&2
  exec "$PY" -m videollama2.pruners "${args[@]}" "${REST_ARGS[@]}"
}
