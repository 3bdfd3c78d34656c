#!/usr/bin/env bash
# Train the parts of the embedded VideoLLaMA2-AV on the pretrained SmolLM2-135M-Instruct decoder
# (towers and projectors, decoder frozen) on the hard synthetic AV task, then assemble the
# checkpoint and score it on the task's held-out split. CPU only: the trainer's whole run
# (loading, pool, all stages, its own scoring) is capped at 55 minutes on 2 cores (--minutes 55);
# writing the hard data (first run only, about a minute), assembly and the final eval add a few.
#   stage 1  towers and projectors on the task's probe labels (no decoder pass),
#   stage 1b projectors onto the decoder's word embeddings of what each media token carries (no decoder pass),
#   stage 3  a rank-16 LoRA on decoder layers 14-29 (merged at assembly) with the parts frozen and the hidden
#            states entering layer 14 cached, 8 questions per clip as one conversation, bf16, 800-step schedule.
# Stage 2 (the parts on the answers through the 30 frozen layers) is off (--stage3-share 1): in a first run
# with 4 questions per clip, 192 stage-2 steps (15 min) left the validation accuracy at 0.38, while 400
# LoRA steps took it to 0.49-0.54 (held-out 0.503).
# Extra arguments go to the trainer and override these settings (python -m videollama2.embedded.train_smol -h).
#
#   bash scripts_videollama2/embedded/train_videollama2_av_smol.sh [--seed 1234] [--minutes 55] [...]
set -euo pipefail
source "$(dirname "$0")/../../scripts/lib/paths.sh"
enter_repo "$@"  # the caller's relative paths (--out ...), not the repository root's
set -- "${ABS_ARGS[@]}"
data=playground/embedded/AVInstruct-hard

if [ ! -f "$data/avinstruct_avqa_music_eval.json" ]; then
  "$PY" -m videollama2.embedded.synthetic_av --variant hard --seed 0 --out "$data"
fi
"$PY" -m videollama2.embedded.train_smol --out checkpoints/embedded/videollama2-av-smol-parts \
    --variant hard --minutes 55 --threads 2 --bf16 \
    --encoder-steps 600 --align-steps 300 --align-lr 3e-3 --pool 600 --refresh 2 --batch-size 8 --turns 8 --lr 1e-3 --aux-weight 0.5 \
    --stage3-share 1 --lora-rank 16 --lora-layers 14-29 --cached --lora-lr 2e-3 --steps 800 \
    --val-clips 40 --eval-every 100 "$@"
"$PY" -m videollama2.embedded.smol assemble --force
"$PY" -m videollama2.eval --model_path checkpoints/embedded/videollama2-av-smol \
    --data_path "$data/avinstruct_avqa_music_eval.json" --data_folder "$data/AVQA_music"
