"""Train the parts of the embedded LLaVA-NeXT on the pretrained SmolLM2-135M-Instruct decoder.

    python -m llava.embedded.train_smol [--out checkpoints/embedded/llava-next-smol-parts] [--minutes M] ...

The decoder is never trained: it stays the dequantised GGUF (llava/embedded/smol.py), plus at
most a low-rank delta. Data: the synthetic VQA of llava/embedded/train.py, multi-turn
conversations from a refreshed in-memory pool (task "train"); a --caption-rate share of them
end with a "describe the image." turn (dense labels: every object's colour, shape and sides).

Stage 1, decoder frozen:
  1a. the CLIP-architecture tower learns the tiny trainer's per-image-token probe labels plus the
      object count on base-view tokens (train.pretrain_vision; no decoder pass, so cheap);
  1b. the projector learns to put each image token on the decoder's own input embeddings of the
      words that name it ("soft words", no decoder pass either); image_newline = embedding of "\n";
  1c. optional (--frozen-minutes): projector, image_newline and tower on the answer tokens,
      back-propagated through all 30 frozen layers (slow: see the trial notes in training_info).
Stage 2 (--lora-rank > 0): a LoRA (peft) on decoder linears. With --cached the image path is
  frozen and the LoRA sits in layers >= S only, so the hidden states entering layer S are computed
  once per pool conversation and each step runs layers S..29 alone.

Cost is the decoder's forward and backward on every token, hence few image tokens (24 for a
64x64 image), no system prompt, several questions per image, logits only at the answer positions,
sorted micro-batches (little padding) and, with --bf16, bfloat16 autocast. Each stage stops at its
share of --minutes (the whole run, loading and final scoring included). At the end the held-out
eval split is scored with llava.eval's evaluate() on exactly the tensors `smol assemble` writes.

Writes --out atomically: parts.safetensors, parts.json, adapter_config.json and
adapter_model.safetensors (peft format, when a LoRA was trained), training_info.json, and
probe_head.safetensors (the probe, only for --init-parts of a later run).

The pieces: llava/embedded/train_smol_targets.py (conversations, probe targets, soft words),
train_smol_stages.py (the stages and the run), train_smol_lora.py (the LoRA); this module is the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llava.embedded import smol
from llava.embedded.train_smol_lora import LORA_TARGETS
from llava.embedded.train_smol_stages import train
from mmprune.embedded import smollm2
from mmprune.base.errors import UserInputError


def parse_args(argv=None) -> argparse.Namespace:
    from mmprune.base.entry import OneLineErrorParser

    parser = OneLineErrorParser(prog="python -m llava.embedded.train_smol",
                                description="Train tower, projector (and a LoRA) of the SmolLM2 LLaVA-NeXT.")
    smollm2.add_trainer_arguments(parser, smol.PARTS_DIR)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast in training steps")
    parser.add_argument("--tile", type=int, default=smol.TILE, help="CLIP image size (anyres tile)")
    parser.add_argument("--patch", type=int, default=smol.PATCH, help="CLIP patch size")
    parser.add_argument("--pinpoints", default=",".join(f"{h}x{w}" for h, w in smol.IMAGE_GRID_PINPOINTS),
                        help="anyres grid pinpoints, HxW,...")
    parser.add_argument("--init-parts", type=Path, default=None,
                        help="start from this parts folder (tower, projector, probe head) instead of fresh ones")
    data = parser.add_argument_group("data")
    data.add_argument("--pool", type=int, default=2000, help="encoded training conversations in memory")
    data.add_argument("--refresh", type=int, default=2, help="pool samples replaced every step")
    data.add_argument("--max-turns", type=int, default=8, help="questions per training conversation")
    data.add_argument("--caption-rate", type=float, default=0.0,
                      help="fraction of training conversations that end with a 'describe the image.' turn")
    data.add_argument("--val-samples", type=int, default=100)
    data.add_argument("--eval-every", type=int, default=100, help="steps between validation runs (0: never)")
    data.add_argument("--no-heldout", action="store_true", help="skip the final held-out scoring (trials)")
    vision = parser.add_argument_group("stage 0: vision tower on probe labels")
    vision.add_argument("--vision-steps", type=int, default=800)
    vision.add_argument("--vision-batch-size", type=int, default=64)
    vision.add_argument("--vision-lr", type=float, default=2e-3)
    vision.add_argument("--vision-minutes", type=float, default=6.0, help="most minutes of stage 0")
    align = parser.add_argument_group("stage 1b: projector onto the decoder's word embeddings")
    align.add_argument("--align-steps", type=int, default=800, help="0 skips it")
    align.add_argument("--align-lr", type=float, default=3e-3)
    align.add_argument("--side-scale", type=float, default=1.0, help="weight of the side words in the soft words")
    vqa_group = parser.add_argument_group("stages 1c and 2: answers through the decoder")
    vqa_group.add_argument("--frozen-minutes", type=float, default=None,
                           help="minutes of stage 1 (default: all that is left when --lora-rank is 0, else half)")
    vqa_group.add_argument("--batch-size", type=int, default=8)
    vqa_group.add_argument("--micro-batch", type=int, default=4,
                           help="conversations per forward; a batch is sorted by length first (less padding)")
    vqa_group.add_argument("--projector-lr", type=float, default=2e-3)
    vqa_group.add_argument("--tower-lr", type=float, default=2e-4)
    vqa_group.add_argument("--aux-weight", type=float, default=0.5)
    vqa_group.add_argument("--warmup", type=int, default=20)
    vqa_group.add_argument("--weight-decay", type=float, default=0.01)
    vqa_group.add_argument("--projector-init-scale", type=float, default=1.0,
                           help="multiplies the projector's last layer at init")
    lora = parser.add_argument_group("stage 2: LoRA on the decoder")
    lora.add_argument("--lora-rank", type=int, default=0, help="0: no LoRA, no stage 2")
    lora.add_argument("--lora-alpha", type=float, default=None, help="default 2 x rank")
    lora.add_argument("--lora-lr", type=float, default=1e-3)
    lora.add_argument("--lora-layers", default="all", help="'all', or decoder layer indices like 0-9,20")
    lora.add_argument("--lora-targets", default=",".join(LORA_TARGETS))
    lora.add_argument("--init-adapter", type=Path, default=None,
                      help="start the LoRA from this adapter folder (same rank, layers and targets)")
    lora.add_argument("--cached", action="store_true",
                      help="freeze the image path in stage 2 and cache, per conversation, the hidden states entering "
                           "the lowest LoRA layer: steps run only the layers above")
    lora.add_argument("--cached-pool", type=int, default=400, help="cached conversations (refreshed like the pool)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        info = train(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    heldout = info["heldout_eval"]
    print(json.dumps({"out": str(args.out), "minutes": info["minutes"],
                      "validation_accuracy": info["validation"]["accuracy"],
                      "heldout_accuracy": heldout["accuracy"] if heldout else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
