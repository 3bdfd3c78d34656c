"""Train the tiny LLaVA-NeXT of the embedded default on synthetic VQA.

    python -m llava.embedded.train --out checkpoints/embedded/llava-next-tiny [--minutes M] [--seed S]

Training conversations (1 to --max-turns questions about one image, none answerable from an
earlier turn; task name "train", this seed, so the
committed calibration and eval images are never seen) are encoded by the real processor into a
pool held in memory (`mmprune.embedded.training.SamplePool`); `--refresh` of them are replaced by new ones
every step, so drawing and encoding stay a small part of a step.

1. Vision pre-training (real LLaVA starts from a pre-trained CLIP; we have none offline): a
   throw-away linear probe on each patch feature LLaVA-NeXT feeds to the projector (the layer and
   strategy of the config) teaches the CLIP tower, per image token, which (shape, colour) pair is
   painted over it, whether it is in the base view or a crop, and, in the base view (the only tile
   whose patch positions are global), which side of the middle its object lies on.
2. The whole model on the answer tokens (each answer word and its <|eot_id|>), plus
   `--aux-weight` x the same probe loss so the tower keeps those features while the decoder
   learns to read them, plus `--layout-weight` x a second throw-away probe on the output of
   decoder layer `--layout-layer`: is each image token in the left / top half of the image. CLIP
   sees every crop alone, so only the decoder can place a crop token, from where it sits between
   the newline tokens; without this probe left/right questions stayed near chance in our trials.
   AdamW with warmup and cosine decay, gradient clipping at 1.

The schedule ends at --steps or when the --minutes budget of the whole run (pool, stages, final
scoring) is spent, whichever comes first, so the run fits the time on slower machines. Progress
and a periodic accuracy on a separate in-memory validation set (task "val") go to stderr. At the
end the committed held-out eval split (if present) is scored once for training_info.json; it is
never used to choose anything.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

from llava.data import collate, encode_conversation, load_records, model_inputs
from mmprune.embedded.training import SamplePool, warmup_cosine
from llava.embedded import paths, synthetic_vqa as vqa, tiny
from llava.eval import evaluate
from mmprune.base.entry import run_main
from mmprune.base.output import atomic_output_dir, check_output_dir

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
    parser.add_argument("--max-turns", type=int, default=10, help="questions per training conversation")
    parser.add_argument("--vision-steps", type=int, default=1000, help="stage-1 steps (0 skips it)")
    parser.add_argument("--vision-batch-size", type=int, default=64)
    parser.add_argument("--aux-weight", type=float, default=0.5,
                        help="weight of the probe loss on the image tokens during stage 2")
    parser.add_argument("--layout-weight", type=float, default=0.5,
                        help="weight of the decoder layout probe (each image token's left/top half)")
    parser.add_argument("--layout-layer", type=int, default=0, help="decoder layer the layout probe reads")
    parser.add_argument("--pool", type=int, default=3000, help="encoded training conversations in memory")
    parser.add_argument("--refresh", type=int, default=4, help="pool samples replaced by new ones every step")
    parser.add_argument("--vision-lr", type=float, default=2e-3)
    parser.add_argument("--val-samples", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=250, help="steps between validation runs")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ samples


def make_pool(processor, rng: random.Random, max_turns: int, tile: int = tiny.TILE,
              patch: int = tiny.PATCH) -> SamplePool:
    """Pool of (encoded conversation, scene, per-token probe targets): real processor output.
    `tile` and `patch` are the model's CLIP image and patch sizes."""
    def make():
        scene, turns = vqa.make_conversation(rng, vqa.MAX_OBJECTS, max_turns)
        record = vqa.conversation_record(turns, TRAIN_TASK, 0)
        return encode_conversation(processor, record, vqa.render(scene)), scene, token_targets(scene, tile, patch)
    return SamplePool(make)


# ------------------------------------------------------------------------------ auxiliary probe
#
# A linear probe on every image token's CLIP feature (the ones LLaVA-NeXT projects) learns, per
# token: which (shape, colour) pairs are painted over it, whether it belongs to the base view
# (the whole image at tile size) or to a crop, and, on base-view tokens only, which side of the
# middle its object lies on. Only the base view has patch positions that are global to the image,
# so crop tokens (and tokens off objects) get the neutral side target 0.5.

SIDES = ("left", "right", "top", "bottom")
CHANNELS = len(PAIRS) + 1 + len(SIDES)  # pairs, base view, sides
BASE_CHANNEL = len(PAIRS)
COVERAGE = 0.15  # fraction of a patch an object must paint to count as over it
CROP_CANVAS = (max(h for h, _ in vqa.IMAGE_SIZES), max(w for _, w in vqa.IMAGE_SIZES))


def _block_means(masks: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(objects, rows * cols): each object's painted fraction of each cell of a rows x cols grid
    laid over the masks (objects, height, width), cells in row-major order."""
    n, height, width = masks.shape
    if height % rows or width % cols:
        raise ValueError(f"a {height}x{width} mask does not split into a {rows}x{cols} grid")
    cells = masks.reshape(n, rows, height // rows, cols, width // cols)
    return cells.mean(axis=(2, 4)).reshape(n, rows * cols)


def token_coverage(scene, tile: int = tiny.TILE, patch: int = tiny.PATCH) -> np.ndarray:
    """(objects, image tokens) painted fraction, tokens in the order of the projected features:
    the base view (image resized to one tile), then the crops of the anyres canvas row by row.

    Follows the processor's geometry for the embedded sizes: every image picks the canvas
    CROP_CANVAS unscaled and is zero-padded to it, centred (LlavaNextImageProcessor)."""
    masks = vqa.object_masks(scene)
    per_side = tile // patch
    canvas_h, canvas_w = CROP_CANVAS
    if max(scene.height / canvas_h, scene.width / canvas_w) != 1:
        raise ValueError(f"image {scene.height}x{scene.width} does not fill the {CROP_CANVAS} canvas unscaled")
    top, left = (canvas_h - scene.height) // 2, (canvas_w - scene.width) // 2
    canvas = np.zeros((len(masks), canvas_h, canvas_w), dtype=bool)
    canvas[:, top:top + scene.height, left:left + scene.width] = masks
    tiles_y, tiles_x = canvas_h // tile, canvas_w // tile
    grid = _block_means(canvas, tiles_y * per_side, tiles_x * per_side).reshape(
        len(masks), tiles_y, per_side, tiles_x, per_side)
    crops = grid.transpose(0, 1, 3, 2, 4).reshape(len(masks), -1)  # tile-major, then patch-major
    return np.concatenate([_block_means(masks, per_side, per_side), crops], axis=1)


def token_targets(scene, tile: int = tiny.TILE, patch: int = tiny.PATCH, base_coverage: float = COVERAGE) -> torch.Tensor:
    """(image tokens, CHANNELS) float32 probe targets of one scene. `base_coverage` is the
    threshold of the base-view tokens (a base cell spans (canvas / tile)^2 crop patches, so an
    object covers a smaller fraction of it)."""
    coverage = token_coverage(scene, tile, patch)
    tokens = coverage.shape[1]
    base = (tile // patch) ** 2
    targets = torch.zeros(tokens, CHANNELS)
    targets[:base, BASE_CHANNEL] = 1.0
    # Side is unknowable on crops and meaningless off objects: "no side" (0.5) there, so crop
    # tokens carry no side signal that contradicts the base view's.
    targets[:, BASE_CHANNEL + 1:] = 0.5
    threshold = np.full(tokens, COVERAGE)
    threshold[:base] = base_coverage
    over = torch.from_numpy(coverage >= threshold)
    for i, obj in enumerate(scene.objects):
        targets[over[i], PAIRS.index((obj.shape, obj.color))] = 1.0
    dominant = coverage[:, :base].argmax(axis=0)
    for token in np.flatnonzero(coverage[:, :base].max(axis=0) >= base_coverage):
        obj = scene.objects[dominant[token]]
        cx, cy = obj.center
        sides = ("left" if cx < (scene.width - 1) / 2 else "right",
                 "top" if cy < (scene.height - 1) / 2 else "bottom")
        targets[token, BASE_CHANNEL + 1:] = 0.0
        for side in sides:
            targets[token, BASE_CHANNEL + 1 + SIDES.index(side)] = 1.0
    return targets


def probe_loss(head: torch.nn.Module, features: torch.Tensor, items: list) -> torch.Tensor:
    """Mean per-token binary cross-entropy of the linear probe on features (images, tokens, width)
    against the pool items' token targets."""
    targets = torch.stack([item[2] for item in items])
    return torch.nn.functional.binary_cross_entropy_with_logits(head(features), targets)


def layout_targets(height: int, width: int, n_image_tokens: int, tile: int = tiny.TILE,
                   patch: int = tiny.PATCH) -> torch.Tensor:
    """(image tokens, 3): [left half, top half, weight] of each image token in the model's order
    (base view (tile/patch)^2, then the unpadded crop grid row by row with a newline token closing
    each row; newlines get weight 0)."""
    per_side = tile // patch
    canvas_h, canvas_w = CROP_CANVAS
    rows = height * (canvas_h // tile) * per_side // canvas_h
    cols = width * (canvas_w // tile) * per_side // canvas_w

    def grid(n_rows: int, n_cols: int, newline: bool) -> torch.Tensor:
        r, c = torch.meshgrid(torch.arange(n_rows), torch.arange(n_cols + newline), indexing="ij")
        is_patch = c < n_cols
        return torch.stack([(c < n_cols / 2) & is_patch, (r < n_rows / 2) & is_patch, is_patch], -1).reshape(-1, 3)

    out = torch.cat([grid(per_side, per_side, False), grid(rows, cols, True)]).float()
    if len(out) != n_image_tokens:
        raise ValueError(f"layout of a {height}x{width} image has {len(out)} tokens, the prompt {n_image_tokens}")
    return out


class LayoutTap:
    """Output of decoder layer `index` for a linear probe of each image token's half (left/top)."""

    def __init__(self, model, index: int):
        self.hidden = None
        self.geometry = (model.config.vision_config.image_size, model.config.vision_config.patch_size)
        layer = model.model.language_model.layers[index]
        self.handle = layer.register_forward_hook(lambda m, a, o: setattr(self, "hidden", o[0] if isinstance(o, tuple) else o))

    def loss(self, head, batch, items, image_token_id) -> torch.Tensor:
        mask = batch["input_ids"] == image_token_id
        targets = torch.cat([layout_targets(int(e["image_sizes"][0, 0]), int(e["image_sizes"][0, 1]), int(m.sum()),
                                            *self.geometry)
                             for (e, *_), m in zip(items, mask)])
        logits = head(self.hidden[mask])
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, targets[:, :2], weight=targets[:, 2:].expand(-1, 2))


class FeatureTap:
    """Keeps the CLIP features LLaVA-NeXT projects (the config's layer and strategy), as
    (images, tiles x tokens, width), each time the vision tower runs inside the model."""

    def __init__(self, model):
        self.config = model.config
        self.features = None
        self.handle = model.model.vision_tower.register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        features = output.hidden_states[self.config.vision_feature_layer]
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]  # drop CLS, as the model does
        self.features = features

    def per_image(self, images: int) -> torch.Tensor:
        # every image of the task has the same number of tiles (one anyres pinpoint)
        return self.features.reshape(images, -1, self.features.shape[-1])


def descend(optimizer, loss: torch.Tensor, pool: SamplePool, refresh: int, rng: random.Random, losses: list) -> None:
    """One optimiser step down `loss`, then `refresh` fresh samples into the pool; the loss joins `losses`."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    pool.refresh(refresh, rng)
    losses.append(loss.item())


def pixel_batch(items: list) -> tuple:
    return torch.cat([e["pixel_values"] for e, *_ in items]), torch.cat([e["image_sizes"] for e, *_ in items])


def pretrain_vision(model, head, tap: FeatureTap, pool: SamplePool, rng: random.Random, args,
                    deadline: float) -> dict:
    """Stage 1: the CLIP tower learns the probe's labels, a stand-in for the pre-trained CLIP of
    the real model (we have none offline). Without it shape features stayed at chance for
    thousands of steps in our trials."""
    tower = model.model.vision_tower
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=args.weight_decay)
    model.train()
    losses = []
    step = 0
    for step in tqdm(range(args.vision_steps), desc="stage 1 (vision)", file=sys.stderr):
        if time.monotonic() > deadline:
            break
        items = pool.draw(args.vision_batch_size, rng)
        pixels, _ = pixel_batch(items)
        tower(pixels.flatten(0, 1), output_hidden_states=True)
        loss = probe_loss(head, tap.per_image(len(items)), items)
        descend(optimizer, loss, pool, args.refresh, rng, losses)
    else:
        step = args.vision_steps
    return {"steps": step, "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5)}


# ------------------------------------------------------------------------------ stage 2


def train_vqa(model, head, tap: FeatureTap, layout, processor, pool: SamplePool, rng: random.Random, args, start: float,
              deadline: float, val_records: list, val_folder) -> dict:
    """Stage 2: the whole model on the answer tokens, plus aux_weight x the CLIP probe loss and
    layout_weight x the decoder layout probe loss (`layout` is the (LayoutTap, probe head) pair);
    progress is the larger of the step fraction and the time fraction."""
    params = list(model.parameters()) + list(head.parameters()) + list(layout[1].parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
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
            group["lr"] = warmup_cosine(step, progress, args.warmup, args.lr)
        items = pool.draw(args.batch_size, rng)
        batch = collate([e for e, *_ in items], processor.tokenizer.pad_token_id)
        out = model(**model_inputs(batch), labels=batch["labels"])
        loss = out.loss
        total = loss
        if args.aux_weight:  # keeps the tower's features of stage 1 while the decoder learns
            total = loss + args.aux_weight * probe_loss(head, tap.per_image(len(items)), items)
        if args.layout_weight:
            total = total + args.layout_weight * layout[0].loss(layout[1], batch, items, model.config.image_token_id)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        pool.refresh(args.refresh, rng)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", progress=f"{progress:.2f}")
        if step % args.eval_every == 0:
            val = evaluate(model, processor, val_records, val_folder, progress=False)
            history.append({"step": step, "loss": round(loss.item(), 4), "val_accuracy": val["accuracy"],
                            "per_kind": {k: v["accuracy"] for k, v in val["per_kind"].items()},
                            "minutes": round((time.monotonic() - start) / 60, 2)})
            bar.write(f"step {step}: loss {loss.item():.3f} val accuracy {val['accuracy']:.3f} "
                      + " ".join(f"{k}={v['accuracy']:.2f}" for k, v in val["per_kind"].items()))
    bar.close()
    return {"steps": step, "history": history}


# ------------------------------------------------------------------------------ driver


def save_checkpoint(model, processor, out: Path, info: dict) -> None:
    """Write model, processor and training_info.json, replacing `out` only once all is written."""
    from llava.adapter import save_weights

    with atomic_output_dir(str(out), overwrite=True) as staging:
        save_weights(model, staging)  # safetensors, llava-hf key layout
        processor.save_pretrained(staging)
        with open(Path(staging) / "training_info.json", "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
            f.write("\n")


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    model, processor = tiny.build(args.seed)
    head = torch.nn.Linear(model.config.vision_config.hidden_size, CHANNELS)
    tap = FeatureTap(model)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    rng = vqa.task_rng(TRAIN_TASK, args.seed)
    pool = make_pool(processor, rng, args.max_turns)
    pool.fill(args.pool)
    pool_minutes = (time.monotonic() - start) / 60
    with tempfile.TemporaryDirectory() as tmp:
        val_records = vqa.write_task(VAL_TASK, args.val_samples, args.seed, Path(tmp))
        # keep time for the final validation and held-out evaluation inside the budget
        tick = time.monotonic()
        evaluate(model, processor, val_records[:20], tmp, progress=False)
        heldout_records = load_records(paths.EVAL_DATA_PATH) if paths.EVAL_DATA_PATH.is_file() else []
        reserve = (time.monotonic() - tick) / 20 * (len(val_records) + len(heldout_records)) * 1.3 + 10
        stage1 = pretrain_vision(model, head, tap, pool, rng, args, deadline - reserve) if args.vision_steps > 0 else None
        stage1_minutes = (time.monotonic() - start) / 60 - pool_minutes
        layout = (LayoutTap(model, args.layout_layer), torch.nn.Linear(model.config.text_config.hidden_size, 2))
        stage2 = train_vqa(model, head, tap, layout, processor, pool, rng, args, start, deadline - reserve, val_records, tmp)
        train_minutes = (time.monotonic() - start) / 60
        final_val = evaluate(model, processor, val_records, tmp, progress=False)
    tap.handle.remove()
    layout[0].handle.remove()
    heldout = None
    if heldout_records:
        heldout = evaluate(model, processor, heldout_records, paths.EVAL_IMAGE_FOLDER, desc="held-out eval")
    info = {
        "seed": args.seed,
        "minutes": round((time.monotonic() - start) / 60, 2),
        "train_minutes": round(train_minutes, 2),
        "pool_minutes": round(pool_minutes, 2),
        "threads": args.threads,
        "pool": args.pool, "refresh_per_step": args.refresh, "samples_generated": pool.made,
        "stage1_vision": {"steps": stage1["steps"], "batch_size": args.vision_batch_size,
                          "lr": args.vision_lr, "final_probe_loss": stage1["final_loss"],
                          "minutes": round(stage1_minutes, 2)} if stage1 else None,
        "steps": stage2["steps"],
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "max_turns": args.max_turns,
        "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
        "aux_weight": args.aux_weight,
        "layout_weight": args.layout_weight, "layout_layer": args.layout_layer,
        "validation": final_val,
        "heldout_eval": heldout,
        "heldout_eval_path": str(paths.EVAL_DATA_PATH.relative_to(paths.REPO_ROOT)),
        "history": stage2["history"],
        "data": {
            "generator": "llava.embedded.synthetic_vqa",
            "train": {"task": TRAIN_TASK, "seed": args.seed,
                      "turns": f"1-{args.max_turns} questions per image, 1-{vqa.MAX_OBJECTS} objects",
                      "pool": f"{args.pool} encoded conversations, {args.refresh} replaced per step"},
            "probe_labels": "per image token: (shape, color) pairs painted over it, base view or crop, and on the base view the side of the middle its object lies on",
            "validation": {"task": VAL_TASK, "seed": args.seed, "n": args.val_samples},
            "kinds": list(vqa.KINDS), "shapes": list(vqa.SHAPES), "colors": list(vqa.COLORS),
            "image_sizes_hw": [list(s) for s in vqa.IMAGE_SIZES], "max_objects": vqa.MAX_OBJECTS,
            "loss": "answer tokens (answer word and <|eot_id|>), plus aux_weight x CLIP probe loss, plus "
                    "layout_weight x decoder layout probe loss",
            "layout_labels": "per image token after decoder layer layout_layer: left half, top half (newlines unlabelled)",
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    save_checkpoint(model, processor, args.out, info)
    return info


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    # before the training: the folder is replaced at the end, and only if this project wrote it
    check_output_dir(str(args.out), True, [paths.DATA_ROOT], flag="--out")
    info = train(args)
    heldout = info["heldout_eval"]
    summary = {"out": str(args.out), "steps": info["steps"], "minutes": info["minutes"],
               "validation_accuracy": info["validation"]["accuracy"],
               "heldout_accuracy": heldout["accuracy"] if heldout else None}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
