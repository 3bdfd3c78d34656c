#!/usr/bin/env bash
# Usage: bash scripts_videollama2/prune/atv.sh [SPARSITY=0.5] [unstructured|2:4|4:8] [extra videollama2.pruners flags]
# ATV-Pruning: Wanda's score over the text tokens plus the highest-drift video and audio tokens of each block
# (--atv_alpha, default 1; --atv_modalities separate|pooled). docs/method.md, section ATV.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
prune_main atv "$@"
