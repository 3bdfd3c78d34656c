"""Train the tiny VideoLLaMA2-AV of the embedded default on synthetic audio-visual QA (CPU).

    python -m videollama2.embedded.train --out checkpoints/embedded/videollama2-av-tiny
        [--minutes M] [--steps N] [--seed S] [--threads T] [...]

Training clips come from `synthetic_av` with seeds that no committed file uses; each is encoded to
mp4 (H.264 + AAC) and decoded by the same loader as calibration and evaluation (decord, fbank),
so the model sees what the pruning run feeds it. A pool of decoded clips is kept in memory and
`--refresh` clips of it are replaced by new ones every step. Each sample is one clip with a
random question of a random kind (KIND_WEIGHTS); the loss is on the answer tokens only (the answer and
<|im_end|>), plus auxiliary linear probes on the encoded media (AuxiliaryHeads, not part of the
checkpoint). A first stage (--encoder-steps) trains only the towers and projectors on those
probes, standing in for the pre-trained SigLIP and BEATs of the real model. AdamW, linear warmup, cosine decay to 10%, gradient clipping at 1. A validation set
of fresh clips (another seed) is scored every --eval-every steps on stderr; at the end the
committed held-out eval split is scored once for training_info.json (never used to choose
anything). The whole run (pool, training, evaluation) is capped by --minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from mmprune.embedded.training import SamplePool
from videollama2.checkpoint.saving import save_model
from videollama2.data import collate, conversation_segments, load_records, tokenize_segments
from videollama2.embedded import paths, synthetic_av as av, tiny
from videollama2.eval import evaluate
from mmprune.base.entry import run_main
from mmprune.base.output import atomic_output_dir, check_output_dir
from videollama2.media import MediaLoader, audio_features, clip_concat, fit_length, frame_indices, normalize_frames, \
    read_video_audio, read_video_frames, resize_frames

VAL_SEED = 777_000
SHARD_BYTES = 2_500_000  # a few shards + index, as the released checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m videollama2.embedded.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to (over)write")
    parser.add_argument("--seed", type=int, default=1234, help="model init and training data seed")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps (the LR schedule length)")
    parser.add_argument("--minutes", type=float, default=42.0,
                        help="wall-clock cap on the whole run; training stops early to fit it")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--pool", type=int, default=2000, help="decoded training clips held in memory")
    parser.add_argument("--refresh", type=int, default=2, help="pool clips replaced by new ones every step")
    parser.add_argument("--val-clips", type=int, default=60, help="validation clips (x3 question kinds)")
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--aux-weight", type=float, default=0.5,
                        help="weight of the auxiliary encoder losses (AuxiliaryHeads) while training the whole model")
    parser.add_argument("--encoder-steps", type=int, default=400,
                        help="first stage: steps training only the towers and projectors on the auxiliary losses")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the tiny matrices gain little from more, and on busy cores "
                             "OpenMP threads spin)")
    return parser.parse_args(argv)


class ClipPool(SamplePool):
    """Decoded training clips: resized uint8 frames and fbank features, with their ClipSpec."""

    def __init__(self, model, folder: Path, seed: int, variant: str = "basic"):
        super().__init__(self.make_clip)
        self.config = model.config
        self.image_size = model.image_size
        self.folder = folder
        self.variant = variant
        self.next_seed = av.TRAIN_SEED_OFFSET + seed * 100_000

    def make_clip(self):
        spec, frames, audio = av.make_clip(self.next_seed, self.variant)
        self.next_seed += 1
        path = self.folder / "clip.mp4"
        path.write_bytes(av.encode_mp4(frames, audio))
        config = self.config
        video = resize_frames(read_video_frames(path, config.num_frames), self.image_size)
        samples = clip_concat(read_video_audio(path), config.audio_clips, config.audio_clip_seconds,
                              spacing=config.audio_clip_spacing)
        return spec, video, audio_features(fit_length(samples, config.audio_samples), config.audio_fbank_dtype)

    def fill(self, size: int, desc: str = "training clips") -> None:
        super().fill(size, desc)


class Prompts:
    """Token ids and labels per (question, answer), cached: the task's texts are a closed set."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict = {}

    def encode(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        return self.encode_turns(((question, answer),))

    def encode_turns(self, turns: tuple) -> tuple[list[int], list[int]]:
        """One conversation of (question, answer) turns about the clip (labels on every answer)."""
        key = turns[0] if len(turns) == 1 else tuple(turns)
        if key not in self.cache:
            messages = []
            for i, (question, answer) in enumerate(turns):
                messages += [{"role": "user", "content": f"<video>\n{question}" if i == 0 else question},
                             {"role": "assistant", "content": answer}]
            self.cache[key] = tokenize_segments(self.tokenizer, conversation_segments(self.tokenizer, messages, True))
        return self.cache[key]


# Share of each question kind in a batch: audio questions are learnt first and fastest.
KIND_WEIGHTS = {"video": 0.4, "audio": 0.2, "both": 0.4}


def draw_turns(rng: random.Random, spec, turns: int) -> tuple:
    """Up to `turns` different questions about one clip, kinds drawn by KIND_WEIGHTS (a question
    never comes twice: a later turn could read its answer from an earlier one)."""
    chosen: dict = {}
    for _ in range(3 * turns):
        if len(chosen) == turns:
            break
        kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
        question, answer = av.draw_question(rng, spec, kind)
        chosen.setdefault(question, answer)
    return tuple(chosen.items())


def training_batch(pool: ClipPool, prompts: Prompts, rng: random.Random, batch_size: int,
                   pad_id: int, turns: int = 1) -> tuple[dict, list]:
    """`batch_size` clips, each with one question (or a conversation of `turns` questions)."""
    encoded, specs = [], []
    kinds = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()), k=batch_size)
    for kind in kinds:
        spec, video, fbank = pool.items[rng.randrange(len(pool.items))]
        if turns > 1:
            ids, labels = prompts.encode_turns(draw_turns(rng, spec, turns))
        else:
            ids, labels = prompts.encode(*av.draw_question(rng, spec, kind))
        encoded.append({"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
                        "video": normalize_frames(video).unsqueeze(0), "audio": fbank.unsqueeze(0)})
        specs.append(spec)
    return collate(encoded, pad_id), specs


class AuxiliaryHeads(nn.Module):
    """Training-only linear probes on the encoded media, discarded after training. They stand in
    for the pre-trained encoders of the real model (SigLIP and BEATs come pre-trained): from the
    first steps the towers learn shape, colour, sound and timing features, which the decoder then
    learns to read. Video: mean of each half's tokens -> shape and colour of that half's shape;
    audio: mean of the tokens -> sound, per-time means -> early/late."""

    def __init__(self, width: int, video_steps: int, audio_steps: int):
        super().__init__()
        self.video_steps, self.audio_steps = video_steps, audio_steps
        self.shape = nn.Linear(width, len(av.SHAPES))
        self.color = nn.Linear(width, len(av.COLORS))
        self.sound = nn.Linear(width, len(av.SOUNDS))
        self.timing = nn.Linear(width * audio_steps, len(av.TIMINGS))

    def loss(self, video_tokens: torch.Tensor, audio_tokens: torch.Tensor, specs: list) -> torch.Tensor:
        batch, width = video_tokens.shape[0], video_tokens.shape[-1]
        steps = video_tokens.reshape(batch, self.video_steps, -1, width).mean(2)
        half = self.video_steps // 2
        colors = sorted(av.COLORS)
        losses = []
        for index, part in enumerate((steps[:, :half].mean(1), steps[:, half:].mean(1))):
            shape = torch.tensor([av.SHAPES.index(s.shapes[index].shape) for s in specs])
            color = torch.tensor([colors.index(s.shapes[index].color) for s in specs])
            losses += [F.cross_entropy(self.shape(part), shape), F.cross_entropy(self.color(part), color)]
        sound = torch.tensor([av.SOUNDS.index(s.sound) for s in specs])
        timing = torch.tensor([av.TIMINGS.index(s.timing) for s in specs])
        times = audio_tokens.reshape(batch, self.audio_steps, -1, width).mean(2)
        losses += [F.cross_entropy(self.sound(times.mean(1)), sound),
                   F.cross_entropy(self.timing(times.flatten(1)), timing)]
        return torch.stack(losses).mean()


class HardAuxiliaryHeads(nn.Module):
    """AuxiliaryHeads for the "hard" task: each video time step whose frames all lie in one slot ->
    shape and colour of that slot's shape; the audio tokens' per-time means -> which sound is
    heard in which slot (9 independent yes/no labels: presence, timing and overlap at once)."""

    def __init__(self, width: int, video_steps: int, audio_steps: int, num_frames: int):
        super().__init__()
        self.video_steps, self.audio_steps = video_steps, audio_steps
        frames = frame_indices(av.FRAMES, num_frames)
        per_step = max(1, len(frames) // video_steps)  # the STC sampler's temporal stride
        self.step_slots = []  # (video step, slot) for the steps that show one shape only
        for step in range(video_steps):
            slots = {av.HardClipSpec.slot_of_frame(f) for f in frames[step * per_step:(step + 1) * per_step]}
            if len(slots) == 1:
                self.step_slots.append((step, slots.pop()))
        self.shape = nn.Linear(width, len(av.SHAPES))
        self.color = nn.Linear(width, len(av.COLORS))
        self.heard = nn.Linear(width * audio_steps, len(av.SOUNDS) * len(av.SLOTS))

    def loss(self, video_tokens: torch.Tensor, audio_tokens: torch.Tensor, specs: list) -> torch.Tensor:
        batch, width = video_tokens.shape[0], video_tokens.shape[-1]
        steps = video_tokens.reshape(batch, self.video_steps, -1, width).mean(2)
        colors = sorted(av.COLORS)
        losses = []
        for step, slot in self.step_slots:
            shape = torch.tensor([av.SHAPES.index(s.shapes[slot].shape) for s in specs])
            color = torch.tensor([colors.index(s.shapes[slot].color) for s in specs])
            losses += [F.cross_entropy(self.shape(steps[:, step]), shape),
                       F.cross_entropy(self.color(steps[:, step]), color)]
        heard = torch.zeros(batch, len(av.SOUNDS), len(av.SLOTS))
        for b, spec in enumerate(specs):
            for sound in spec.sounds:
                heard[b, av.SOUNDS.index(sound.sound), sound.slot] = 1.0
        times = audio_tokens.reshape(batch, self.audio_steps, -1, width).mean(2)
        losses.append(F.binary_cross_entropy_with_logits(self.heard(times.flatten(1)), heard.flatten(1)))
        return torch.stack(losses).mean()


def auxiliary_heads(model, variant: str = "basic") -> nn.Module:
    """The training-only probes of the task variant, sized for `model`'s token grids."""
    video_steps = model.model.mm_projector.output_grid(
        model.config.num_frames, model.image_size // model.vision_tower.config.patch_size)[0]
    audio_steps = model.audio_frame_count() // model.audio_tower.cfg.input_patch_size
    width = model.config.text_config().hidden_size
    if variant == "hard":
        return HardAuxiliaryHeads(width, video_steps, audio_steps, model.config.num_frames)
    return AuxiliaryHeads(width, video_steps, audio_steps)


def write_validation(folder: Path, clips: int, variant: str = "basic") -> list:
    records = []
    rng = random.Random(VAL_SEED)
    for i in range(clips):
        spec, frames, audio = av.make_clip(VAL_SEED + i, variant)
        name = f"val_{i:04d}.mp4"
        (folder / name).write_bytes(av.encode_mp4(frames, audio))
        for kind in av.KINDS:
            question, answer = av.draw_question(rng, spec, kind)
            records.append({"id": len(records), "video": name, "audio": name, "kind": kind, "conversations": [
                {"from": "human", "value": f"<video>\n{question}"}, {"from": "gpt", "value": answer}]})
    return records


def media_batch(pool: ClipPool, rng: random.Random, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    items = [pool.items[rng.randrange(len(pool.items))] for _ in range(batch_size)]
    video = torch.stack([normalize_frames(v) for _, v, _ in items])
    audio = torch.stack([a for _, _, a in items])
    return video, audio, [spec for spec, _, _ in items]


def train_encoders(model, aux: AuxiliaryHeads, pool: ClipPool, rng: random.Random, args) -> dict:
    """Stage 1: the towers and projectors (and the probes) on the auxiliary losses only."""
    if args.encoder_steps <= 0:
        return {"steps": 0}
    parts = [model.vision_tower, model.model.mm_projector, model.audio_tower, model.model.mm_projector_a, aux]
    params = [p for part in parts for p in part.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    model.train()
    start = time.monotonic()
    losses = []
    for step in tqdm(range(args.encoder_steps), desc="encoders", file=sys.stderr):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        video, audio, specs = media_batch(pool, rng, args.batch_size)
        loss = aux.loss(model.encode_video(video), model.encode_audio(audio), specs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        pool.refresh(args.refresh, rng)
        losses.append(loss.item())
    return {"steps": args.encoder_steps, "final_aux_loss": round(float(np.mean(losses[-20:])), 4),
            "minutes": round((time.monotonic() - start) / 60, 2)}


def learning_rate(step: int, steps: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_steps(model, aux, optimizer, params: list, pool: SamplePool, prompts: Prompts, rng: random.Random, args,
                 pad_id: int, stop_at: float, validate, history: list, start: float, desc: str = "train",
                 labelled_only: bool = False, step_loss=None) -> int:
    """Steps on the answer loss (plus aux_weight x the probes) until args.steps or the clock
    reaches `stop_at`; learning rate learning_rate() of each group's "peak" (default args.lr),
    gradients of `params` clipped at 1, `pool` refreshed, `validate()` every args.eval_every steps
    into `history`. Optional args: `turns` (questions per clip, default 1), `bf16` (bfloat16
    autocast). `step_loss()` -> (answer loss, total loss) replaces the clip batch's (then `aux`,
    `prompts` and `pad_id` are unused). Returns the steps done."""
    def clip_loss():
        batch, specs = training_batch(pool, prompts, rng, args.batch_size, pad_id, getattr(args, "turns", 1))
        video_tokens, audio_tokens = model.encode_video(batch["video"]), model.encode_audio(batch["audio"])
        loss = model.lm_loss(batch["input_ids"], batch["attention_mask"], batch["labels"], video_tokens,
                             audio_tokens, labelled_only=labelled_only)
        if not args.aux_weight:
            return loss, loss
        return loss, loss + args.aux_weight * aux.loss(video_tokens.float(), audio_tokens.float(), specs)

    step_loss = step_loss or clip_loss
    bar = tqdm(range(args.steps), desc=desc, file=sys.stderr)
    step = 0
    for step in bar:
        if time.monotonic() > stop_at:
            bar.write(f"time cap of {args.minutes} min reached at step {step}")
            break
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.warmup, group.get("peak", args.lr))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=getattr(args, "bf16", False)):
            loss, total = step_loss()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        pool.refresh(args.refresh, rng)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if args.eval_every and (step + 1) % args.eval_every == 0:
            val = validate()
            history.append({"stage": desc, "step": step + 1, "loss": round(loss.item(), 4),
                            "val_accuracy": val["accuracy"],
                            "per_kind": {k: v["accuracy"] for k, v in val["per_kind"].items()},
                            "minutes": round((time.monotonic() - start) / 60, 2)})
            bar.write(f"step {step + 1}: loss {loss.item():.3f} val accuracy {val['accuracy']:.3f} "
                      + " ".join(f"{k}={v['accuracy']:.2f}" for k, v in val["per_kind"].items()))
    else:
        step = args.steps
    bar.close()
    return step


def save_checkpoint(model, tokenizer, out: Path, info: dict) -> None:
    """Write the checkpoint next to `out`, then replace `out` in one rename."""
    with atomic_output_dir(str(out), overwrite=True) as folder:
        staging = Path(folder)
        save_model(model, staging, max_shard_bytes=SHARD_BYTES)
        tokenizer.save_pretrained(staging)
        (staging / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}, indent=1) + "\n")
        (staging / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")


def train(args) -> dict:
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    model, tokenizer = tiny.build(args.seed)
    rng = random.Random(args.seed)
    aux = auxiliary_heads(model)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(aux.parameters()), lr=args.lr,
                                  weight_decay=args.weight_decay)
    prompts = Prompts(tokenizer)
    history = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        val_records = write_validation(tmp, args.val_clips)
        media = MediaLoader.for_config(model.config, model.image_size)
        pool = ClipPool(model, tmp, args.seed)
        pool.fill(args.pool)
        # reserve time for the final validation, held-out evaluation and saving (measured below)
        tick = time.monotonic()
        evaluate(model, tokenizer, val_records[:30], tmp, media, progress=False)
        eval_seconds = (time.monotonic() - tick) / 30
        reserve = eval_seconds * (len(val_records) + 400) * 1.5 + 20
        pool_minutes = (time.monotonic() - start) / 60
        encoder_stage = train_encoders(model, aux, pool, rng, args)
        step = answer_steps(model, aux, optimizer, list(model.parameters()) + list(aux.parameters()), pool, prompts,
                            rng, args, tokenizer.pad_token_id, deadline - reserve,
                            lambda: evaluate(model, tokenizer, val_records, tmp, media, progress=False), history, start)
        train_minutes = (time.monotonic() - start) / 60
        final_val = evaluate(model, tokenizer, val_records, tmp, media, progress=False)
    heldout = None
    if paths.EVAL_DATA_PATH.is_file():
        heldout = evaluate(model, tokenizer, load_records(paths.EVAL_DATA_PATH), paths.MEDIA_FOLDER,
                           MediaLoader.for_config(model.config, model.image_size), desc="held-out eval")
    info = {
        "seed": args.seed, "steps": step, "planned_steps": args.steps, "batch_size": args.batch_size,
        "samples_seen": step * args.batch_size, "lr": args.lr, "warmup": args.warmup,
        "weight_decay": args.weight_decay, "encoder_stage": encoder_stage, "aux_weight": args.aux_weight, "kind_weights": KIND_WEIGHTS,
        "pool": args.pool, "refresh_per_step": args.refresh,
        "clips_generated": pool.next_seed - (av.TRAIN_SEED_OFFSET + args.seed * 100_000),
        "pool_minutes": round(pool_minutes, 2), "train_minutes": round(train_minutes, 2),
        "total_minutes": round((time.monotonic() - start) / 60, 2), "threads": args.threads,
        "validation": final_val, "heldout_eval": heldout,
        "heldout_eval_path": str(paths.EVAL_DATA_PATH.relative_to(paths.REPO_ROOT)), "history": history,
        "data": {"generator": "videollama2.embedded.synthetic_av", "kinds": list(av.KINDS),
                 "train_clip_seeds": f"{av.TRAIN_SEED_OFFSET + args.seed * 100_000} onwards",
                 "validation_clip_seeds": f"{VAL_SEED}..{VAL_SEED + args.val_clips - 1}",
                 "loss": "answer tokens only (answer word and <|im_end|>)"},
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__},
    }
    save_checkpoint(model, tokenizer, args.out, info)
    return info


def main(argv=None) -> int:
    return run_main(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    # before the training: the folder is replaced at the end, and only if this project wrote it
    check_output_dir(str(args.out), True, [paths.DATA_ROOT], flag="--out")
    info = train(args)
    heldout = info["heldout_eval"]
    print(json.dumps({"out": str(args.out), "steps": info["steps"], "total_minutes": info["total_minutes"],
                      "validation_accuracy": info["validation"]["accuracy"],
                      "heldout_accuracy": heldout["accuracy"] if heldout else None,
                      "heldout_per_kind": {k: v["accuracy"] for k, v in heldout["per_kind"].items()} if heldout else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
