#!/usr/bin/env bash
# Sourced by scripts/lib/side_venv.sh (the lmms-eval and vLLM runs of scripts/eval/), from the repository root.
#   dense_model_dir DIR    sets DENSE_MODEL_DIR: DIR itself, or, when DIR was saved with
#                          --save_format compressed (config.json names a compressed-tensors
#                          sparsity_config), its dense copy in a temporary folder (DENSE_TMP, for
#                          the caller to remove). lmms-eval and vLLM cannot read compressed-tensors'
#                          sparse formats (transformers 5 needs compressed-tensors >= 0.15, which
#                          dropped them; vLLM 0.32 refuses sparsity configs), so the copy is written
#                          with the main venv's compressed-tensors (PYTHON, else .venv/bin/python):
#                          byte for byte the dense save (tests/test_sparse_format.py).
dense_model_dir() {
    DENSE_MODEL_DIR="$1"
    DENSE_TMP=""
    if [ -z "$1" ] || ! grep -q '"sparsity_config"' "$1/config.json" 2>/dev/null; then return 0; fi
    local py="${PYTHON:-.venv/bin/python}"
    if [ ! -x "$py" ] && ! command -v "$py" >/dev/null; then
        echo "error: $1 is a compressed checkpoint and its dense copy needs the main venv ($py); run make setup" >&2
        exit 2
    fi
    DENSE_TMP="$(mktemp -d)"
    "$py" -m mmprune.base.sparse_format dense-copy "$1" "$DENSE_TMP/$(basename "$1")" >&2 \
        || { rm -rf "$DENSE_TMP"; exit 2; }
    DENSE_MODEL_DIR="$DENSE_TMP/$(basename "$1")"
}
