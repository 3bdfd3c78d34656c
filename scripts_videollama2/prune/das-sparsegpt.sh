#!/usr/bin/env bash
# Usage: bash scripts_videollama2/prune/das-sparsegpt.sh [SPARSITY=0.5] [unstructured|2:4|4:8] [extra videollama2.pruners flags]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
prune_main das-sparsegpt "$@"
