#!/usr/bin/env bash
# Train the parts of the embedded LLaVA-NeXT on the pretrained SmolLM2-135M-Instruct decoder, then
# assemble the checkpoint and score it on the held-out split. CPU only, under 60 minutes wall on 2
# cores: --minutes caps the trainer's whole run (loading, all stages, its own held-out scoring);
# assembly and the final llava.eval add about 3 minutes. The decoder stays the pretrained one:
#   1a  CLIP tower on per-token probe labels (no decoder pass),
#   1b  projector onto the decoder's own word embeddings of what each token shows (no decoder pass),
#   2   LoRA (rank 16) on decoder layers 14-29, image path frozen, hidden states entering layer 14
#       cached per conversation, so a step runs 16 of the 30 layers.
# Extra arguments go to the trainer and override these settings (python -m llava.embedded.train_smol -h).
#
#   bash scripts/embedded/train_llava_next_smol.sh [--seed 1234] [--minutes 52] [...]
set -euo pipefail
source "$(dirname "$0")/../lib/paths.sh"
enter_repo "$@"  # the caller's relative paths (--out ...), not the repository root's
set -- "${ABS_ARGS[@]}"

"$PY" -m llava.embedded.train_smol --out checkpoints/embedded/llava-next-smol-parts \
    --minutes 52 --threads 2 --bf16 \
    --vision-steps 3000 --vision-lr 3e-3 --vision-minutes 8 \
    --align-steps 600 --align-lr 3e-3 --caption-rate 0.5 \
    --frozen-minutes 0 \
    --lora-rank 16 --lora-lr 2e-3 --lora-layers 14-29 --cached --cached-pool 400 --refresh 3 \
    --val-samples 60 --eval-every 150 "$@"
"$PY" -m llava.embedded.smol assemble --force
"$PY" -m llava.eval --model_path checkpoints/embedded/llava-next-smol
