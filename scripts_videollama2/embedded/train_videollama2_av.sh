#!/usr/bin/env bash
# Regenerate the embedded synthetic audio-visual QA data and retrain the tiny VideoLLaMA2-AV of the
# embedded default, then score it on the held-out split. CPU only, at most 45 minutes on 2 cores
# (the trainer's --minutes cap, 42 by default, covers its pool, training and evaluation).
# Extra arguments go to the trainer, e.g. --minutes 30 --threads 1.
#
#   bash scripts_videollama2/embedded/train_videollama2_av.sh [--seed 1234] [--threads 2] [...]
set -euo pipefail
source "$(dirname "$0")/../../scripts/lib/paths.sh"
enter_repo "$@"  # the caller's relative paths (--out ...), not the repository root's
set -- "${ABS_ARGS[@]}"

"$PY" datasets/make_synthetic_avinstruct.py --seed 0
"$PY" -m videollama2.embedded.train --out checkpoints/embedded/videollama2-av-tiny "$@"
"$PY" -m videollama2.eval --model_path checkpoints/embedded/videollama2-av-tiny
