#!/usr/bin/env bash
# Usage: bash scripts/prune/atv-obs.sh [SPARSITY=0.5] [unstructured|2:4|4:8] [extra llava.pruners flags]
# SparseGPT with its Hessian over ATV-Pruning's tokens: the text tokens plus the highest-drift visual
# tokens of each block (--atv_alpha, default 1; --atv_modalities). docs/method.md, OBS with TAMP's signals.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
prune_main atv-obs "$@"
