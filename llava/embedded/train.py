"""Train the tiny LLaVA-NeXT of the embedded default on freshly drawn synthetic VQA.

    python -m llava.embedded.train --out checkpoints/embedded/llava-next-tiny [--minutes M] [--seed S]

Two stages, both on samples drawn fresh from `synthetic_vqa` with this seed (task names "train"
and "vision"), so the committed calibration and eval images are never seen:

1. Vision pre-training (real LLaVA starts from a pre-trained CLIP; we have none offline): the
   CLIP tower learns to detect (shape, colour) pairs and which half of the image they lie in,
   through a throw-away linear head max-pooled over the patch features LLaVA-NeXT feeds to the
   projector (the layer and strategy of the config). Without it shape features, and so every
   question naming a shape, stayed at chance for thousands of steps in our trials.
2. The whole model on multi-turn VQA conversations (1-4 questions about one image), loss on the
   answer tokens only (each answer word and its <|eot_id|>), AdamW with warmup and cosine decay.
   Scenes start with one object and reach the full 1-3 after 10% of training.

The schedule ends at --steps or at --minutes of wall time, whichever comes first, so the run
fits the time on slower machines. Progress and a periodic accuracy on a separate in-memory
validation set (task "val") go to stderr. At the end the committed held-out eval split (if
present) is scored once for training_info.json; it is never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from llava.data import collate, encode_conversation, load_records, model_inputs
from llava.embedded import paths, synthetic_vqa as vqa, tiny
from llava.eval import evaluate

TRAIN_TASK = "train"
VISION_TASK = "vision"
VAL_TASK = "val"
PAIRS = [(shape, color) for shape in vqa.SHAPES for color in vqa.COLORS]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llava.embedded.train",
                                     description="Train the tiny embedded LLaVA-NeXT on synthetic VQA.")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to (over)write")
    parser.add_argument("--seed", type=int, default=1234, help="model init and training data seed")
    parser.add_argument("--minutes", type=float, default=25.0,
                        help="wall-clock budget of both stages; the LR schedule ends when it is spent")
    parser.add_argument("--steps", type=int, default=6000, help="most steps of stage 2")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-turns", type=int, default=4, help="questions per training conversation")
    parser.add_argument("--vision-steps", type=int, default=1200, help="stage-1 steps (0 skips it)")
    parser.add_argument("--vision-batch-size", type=int, default=64)
    parser.add_argument("--vision-lr", type=float, default=2e-3)
    parser.add_argument("--val-samples", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=250, help="steps between validation runs")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ stage 1


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(images, tokens, width): the CLIP features LLaVA-NeXT projects, all tiles of each image."""
    config = model.config
    images, tiles = pixel_values.shape[:2]
    out = model.model.vision_tower(pixel_values.flatten(0, 1), output_hidden_states=True)
    features = out.hidden_states[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        features = features[:, 1:]  # drop CLS, as the model does
    return features.reshape(images, tiles * features.shape[1], -1)


SIDES = ("present", "left", "right", "top", "bottom")


def pair_labels(scenes: list) -> torch.Tensor:
    """Per (shape, colour) pair: is it present, and is it left/right/top/bottom of the middle."""
    labels = torch.zeros(len(scenes), len(PAIRS), len(SIDES))
    for row, scene in enumerate(scenes):
        for obj in scene.objects:
            cx, cy = obj.center
            horizontal = "left" if cx < (scene.width - 1) / 2 else "right"
            vertical = "top" if cy < (scene.height - 1) / 2 else "bottom"
            for side in ("present", horizontal, vertical):
                labels[row, PAIRS.index((obj.shape, obj.color)), SIDES.index(side)] = 1.0
    return labels.flatten(1)


def pretrain_vision(model, processor, args, deadline: float) -> dict:
    """Stage 1: multi-label (shape, colour) detection and placement from max-pooled patch features."""
    rng = vqa.task_rng(VISION_TASK, args.seed)
    tower = model.model.vision_tower
    head = torch.nn.Linear(tower.config.hidden_size, len(PAIRS) * len(SIDES))
    optimizer = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()),
                                  lr=args.vision_lr, weight_decay=args.weight_decay)
    model.train()
    loss = torch.tensor(float("nan"))
    step = 0
    bar = tqdm(range(args.vision_steps), desc="stage 1 (vision)", file=sys.stderr)
    for step in bar:
        if time.monotonic() > deadline:
            break
        scenes = [s for s in (vqa.random_scene(rng, rng.randint(1, vqa.MAX_OBJECTS))
                              for _ in range(args.vision_batch_size)) if s is not None]
        pixels = processor.image_processor([vqa.render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        logits = head(vision_features(model, pixels)).amax(dim=1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, pair_labels(scenes))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    else:
        step = args.vision_steps
    return {"steps": step, "final_loss": round(loss.item(), 5)}


# ------------------------------------------------------------------------------ stage 2


def training_batch(processor, rng: random.Random, batch_size: int, max_objects: int, max_turns: int) -> dict:
    encoded = []
    for index in range(batch_size):
        scene, turns = vqa.make_conversation(rng, max_objects, max_turns)
        record = vqa.conversation_record(turns, TRAIN_TASK, index)
        encoded.append(encode_conversation(processor, record, vqa.render(scene)))
    return collate(encoded, processor.tokenizer.pad_token_id)


def curriculum_objects(progress: float) -> int:
    """Most objects per scene: 1 for the first 5% of training, 2 until 10%, then all."""
    return 1 if progress < 0.05 else 2 if progress < 0.10 else vqa.MAX_OBJECTS


def learning_rate(step: int, progress: float, warmup: int, peak: float) -> float:
    """Linear warmup over `warmup` steps, cosine decay to 10% of the peak at progress 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_vqa(model, processor, args, start: float, deadline: float, val_records: list, val_folder) -> dict:
    """Stage 2; progress is the larger of the step fraction and the time fraction."""
    rng = vqa.task_rng(TRAIN_TASK, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    stage_start = time.monotonic()
    history = []
    step = 0
    bar = tqdm(total=args.steps, desc="stage 2 (vqa)", file=sys.stderr)
    while True:
        progress = max(step / args.steps,
                       (time.monotonic() - stage_start) / max(1e-9, deadline - stage_start))
        if progress >= 1.0:
            break
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress, args.warmup, args.lr)
        batch = training_batch(processor, rng, args.batch_size, curriculum_objects(progress), args.max_turns)
        loss = model(**model_inputs(batch), labels=batch["labels"]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", progress=f"{progress:.2f}")
        if step % args.eval_every == 0:
            val = evaluate(model, processor, val_records, val_folder, progress=False)
            history.append({"step": step, "loss": round(loss.item(), 4), "val_accuracy": val["accuracy"],
                            "minutes": round((time.monotonic() - start) / 60, 2)})
            bar.write(f"step {step}: loss {loss.item():.3f} val accuracy {val['accuracy']:.3f} "
                      + " ".join(f"{k}={v['accuracy']:.2f}" for k, v in val["per_kind"].items()))
    bar.close()
    return {"steps": step, "history": history}


# ------------------------------------------------------------------------------ driver


def save_checkpoint(model, processor, out: Path, info: dict) -> None:
    """Write model, processor and training_info.json, replacing `out` only once all is written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is meant to be shared
    try:
        model.save_pretrained(staging)  # safetensors, llava-hf key layout
        processor.save_pretrained(staging)
        with open(staging / "training_info.json", "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    model, processor = tiny.build(args.seed)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        val_records = vqa.write_task(VAL_TASK, args.val_samples, args.seed, Path(tmp))
        stage1 = pretrain_vision(model, processor, args, deadline) if args.vision_steps > 0 else None
        stage2 = train_vqa(model, processor, args, start, deadline, val_records, tmp)
        minutes = (time.monotonic() - start) / 60
        final_val = evaluate(model, processor, val_records, tmp, progress=False)
    heldout = None
    if paths.EVAL_DATA_PATH.is_file():
        heldout = evaluate(model, processor, load_records(paths.EVAL_DATA_PATH),
                           paths.EVAL_IMAGE_FOLDER, desc="held-out eval")
    info = {
        "seed": args.seed,
        "minutes": round(minutes, 2),
        "threads": args.threads,
        "stage1_vision": {"steps": stage1["steps"], "batch_size": args.vision_batch_size,
                          "lr": args.vision_lr, "final_loss": stage1["final_loss"]} if stage1 else None,
        "steps": stage2["steps"],
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "max_turns": args.max_turns,
        "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
        "validation": final_val,
        "heldout_eval": heldout,
        "heldout_eval_path": str(paths.EVAL_DATA_PATH.relative_to(paths.REPO_ROOT)),
        "history": stage2["history"],
        "data": {
            "generator": "llava.embedded.synthetic_vqa",
            "stage1": {"task": VISION_TASK, "seed": args.seed, "labels": "(shape, color) pairs present, and left/right/top/bottom"},
            "stage2": {"task": TRAIN_TASK, "seed": args.seed, "fresh_samples_every_step": True,
                       "turns": f"1-{args.max_turns} questions per image",
                       "curriculum": "1 object until 5% of training, up to 2 until 10%, then 1-3"},
            "validation": {"task": VAL_TASK, "seed": args.seed, "n": args.val_samples},
            "kinds": list(vqa.KINDS), "shapes": list(vqa.SHAPES), "colors": list(vqa.COLORS),
            "image_sizes_hw": [list(s) for s in vqa.IMAGE_SIZES], "max_objects": vqa.MAX_OBJECTS,
            "loss": "answer tokens only (answer word and <|eot_id|>)",
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    save_checkpoint(model, processor, args.out, info)
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    info = train(args)
    heldout = info["heldout_eval"]
    summary = {"out": str(args.out), "steps": info["steps"], "minutes": info["minutes"],
               "validation_accuracy": info["validation"]["accuracy"],
               "heldout_accuracy": heldout["accuracy"] if heldout else None}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
