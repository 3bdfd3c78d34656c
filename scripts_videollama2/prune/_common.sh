#!/usr/bin/env bash
# Shared by scripts_videollama2/prune/<method>.sh: positional [SPARSITY=0.5] [unstructured|2:4|4:8],
# then any extra flags for `python -m videollama2.pruners` (flags may also come first:
# `tamp.sh --no_eval` keeps the default sparsity). Environment overrides: MODEL_PATH,
# DATA_PATH, DATA_FOLDER, OUTPUT_DIR, NSAMPLES, SEED, DEVICE, VIT_SPARSITY, AUD_SPARSITY,
# OVERWRITE=1, PYTHON. The allocation cap defaults to SPARSITY + 0.1 as in the public scripts.
# Unset paths fall back to the public scripts' real paths (checkpoints/VideoLLaMA2.1-7B-AV,
# datasets/avinstruct_avqa_music.json, datasets/AVQA_music), or to the embedded default when
# those are absent.
set -euo pipefail

prune_main() {
  local method="$1"; shift
  # positional SPARSITY and TYPE are optional: a first argument starting with "--" is a flag
  local sparsity=0.5 sparsity_type=unstructured
  if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then sparsity="$1"; shift; fi
  if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then sparsity_type="$1"; shift; fi
  case "$sparsity_type" in
    unstructured|2:4|4:8) ;;
    *) echo "error: sparsity type '$sparsity_type' is not one of unstructured, 2:4, 4:8" >&2; exit 2 ;;
  esac
  local root
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  cd "$root"
  local python="${PYTHON:-}"
  if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
  fi
  local args=(--method "$method" --llm_sparsity_ratio "$sparsity" --sparsity_type "$sparsity_type"
              --seed "${SEED:-42}" --nsamples "${NSAMPLES:-128}"
              --vit_sparsity_ratio "${VIT_SPARSITY:-0}" --aud_sparsity_ratio "${AUD_SPARSITY:-0}")
  [ -n "${MODEL_PATH:-}" ] && args+=(--model_path "$MODEL_PATH")
  [ -n "${DATA_PATH:-}" ] && args+=(--data_path "$DATA_PATH")
  [ -n "${DATA_FOLDER:-}" ] && args+=(--data_folder "$DATA_FOLDER")
  [ -n "${OUTPUT_DIR:-}" ] && args+=(--save_model "$OUTPUT_DIR")
  [ -n "${DEVICE:-}" ] && args+=(--device "$DEVICE")
  [ "${OVERWRITE:-0}" = "1" ] && args+=(--overwrite)
  echo "[$method] sparsity $sparsity ($sparsity_type)" >&2
  exec "$python" -m videollama2.pruners "${args[@]}" "$@"
}
