#!/usr/bin/env bash
# Usage: bash scripts/prune/amia-sparsegpt.sh [SPARSITY=0.5] [unstructured|2:4|4:8] [extra llava.pruners flags]
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
prune_main amia-sparsegpt "$@"
