#!/usr/bin/env bash
# Usage: bash scripts_videollama2/prune/atv-obs.sh [SPARSITY=0.5] [unstructured|2:4|4:8] [extra videollama2.pruners flags]
# SparseGPT with its Hessian over ATV-Pruning's tokens: the text tokens plus the highest-drift video and
# audio tokens of each block (--atv_alpha; --atv_modalities separate|pooled). docs/method.md, OBS with TAMP's signals.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
prune_main atv-obs "$@"
