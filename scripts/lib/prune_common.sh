#!/usr/bin/env bash
# Sourced by scripts/prune/_common.sh and scripts_videollama2/prune/_common.sh: what the prune
# scripts of both models share. `prune_setup "$@"` parses the optional positionals
# [SPARSITY=0.5] [unstructured|2:4|4:8] (a first argument starting with "--" is a flag, so
# `tamp.sh --no_eval` keeps the default sparsity), makes the caller's relative paths absolute
# (scripts/lib/paths.sh), moves to the repository root and sets
#   PY           the python to run (PYTHON, else .venv/bin/python, else python3)
#   COMMON_ARGS  the flags every entry point takes, from the positionals and the environment
#                (SEED, NSAMPLES, MODEL_PATH, DATA_PATH, OUTPUT_DIR, DEVICE, OVERWRITE=1,
#                SAVE_FORMAT=dense|compressed, and the placement: DEVICE_MAP, MAX_MEMORY, OFFLOAD_FOLDER;
#                docs/memory-plan.md)
#   REST_ARGS    the remaining arguments, passed on unchanged
#   SPARSITY_ARG, TYPE_ARG
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/paths.sh"

prune_setup() {
  SPARSITY_ARG=0.5
  TYPE_ARG=unstructured
  if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then SPARSITY_ARG="$1"; shift; fi
  if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then TYPE_ARG="$1"; shift; fi
  case "$TYPE_ARG" in
    unstructured|2:4|4:8) ;;
    *) echo "error: sparsity type '$TYPE_ARG' is not one of unstructured, 2:4, 4:8" >&2; exit 2 ;;
  esac
  # relative paths are the caller's, not the repository root's
  absolutize_env MODEL_PATH DATA_PATH IMAGE_FOLDER TASK_SPLIT DATA_FOLDER OUTPUT_DIR OFFLOAD_FOLDER DEVICE_MAP
  enter_repo "$@"
  REST_ARGS=("${ABS_ARGS[@]}")
  COMMON_ARGS=(--llm_sparsity_ratio "$SPARSITY_ARG" --sparsity_type "$TYPE_ARG"
               --seed "${SEED:-42}" --nsamples "${NSAMPLES:-128}")
  if [ -n "${MODEL_PATH:-}" ]; then COMMON_ARGS+=(--model_path "$MODEL_PATH"); fi
  if [ -n "${DATA_PATH:-}" ]; then COMMON_ARGS+=(--data_path "$DATA_PATH"); fi
  if [ -n "${OUTPUT_DIR:-}" ]; then COMMON_ARGS+=(--save_model "$OUTPUT_DIR"); fi
  if [ -n "${DEVICE:-}" ]; then COMMON_ARGS+=(--device "$DEVICE"); fi
  if [ "${OVERWRITE:-0}" = "1" ]; then COMMON_ARGS+=(--overwrite); fi
  if [ -n "${SAVE_FORMAT:-}" ]; then COMMON_ARGS+=(--save_format "$SAVE_FORMAT"); fi
  if [ -n "${DEVICE_MAP:-}" ]; then COMMON_ARGS+=(--device_map "$DEVICE_MAP"); fi
  if [ -n "${MAX_MEMORY:-}" ]; then COMMON_ARGS+=(--max_memory "$MAX_MEMORY"); fi
  if [ -n "${OFFLOAD_FOLDER:-}" ]; then COMMON_ARGS+=(--offload_folder "$OFFLOAD_FOLDER"); fi
}
