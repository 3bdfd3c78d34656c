#!/usr/bin/env bash
# Regenerate the embedded synthetic data and retrain the tiny LLaVA-NeXT of the embedded default.
# CPU only, under 30 minutes wall: --minutes caps the trainer's whole run (sample pool, both
# stages, final validation and held-out scoring). The settings below are those of the committed
# checkpoint (see its training_info.json), trained on an otherwise idle 2-core machine; on a shared
# one, pass --threads 1 (two OpenMP threads there were up to 10x slower). Extra arguments go to the
# trainer and override these.
#
#   bash scripts/embedded/train_llava_next.sh [--seed 1234] [--minutes 26.5] [...]
set -euo pipefail
source "$(dirname "$0")/../lib/paths.sh"
enter_repo "$@"  # the caller's relative paths (--out ...), not the repository root's
set -- "${ABS_ARGS[@]}"

"$PY" datasets/make_synthetic_llava_next.py --seed 0
"$PY" -m llava.embedded.train --out checkpoints/embedded/llava-next-tiny \
    --minutes 26.5 --threads 2 "$@"
"$PY" -m llava.eval --model_path checkpoints/embedded/llava-next-tiny
