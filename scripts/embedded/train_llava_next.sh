#!/usr/bin/env bash
# Regenerate the embedded synthetic data and retrain the tiny LLaVA-NeXT of the embedded default.
# CPU only, about 15 minutes on 2 cores. Extra arguments go to the trainer, e.g. --minutes 20.
#
#   bash scripts/embedded/train_llava_next.sh [--seed 1234] [--threads 2] [...]
set -euo pipefail
cd "$(dirname "$0")/../.."

python datasets/make_synthetic_llava_next.py --seed 0
python -m llava.embedded.train --out checkpoints/embedded/llava-next-tiny "$@"
python -m llava.eval --model_path checkpoints/embedded/llava-next-tiny
