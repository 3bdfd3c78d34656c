"""Calibration sets of the transfer settings of `python -m videollama2.quality --calibration` for
the embedded VideoLLaMA2-AV (docs/method.md, "Calibration settings of the quality grids").

- cross-kind: one video or one audio question (equal shares) about each newly drawn clip; the
  evaluation keeps only the held-out questions that need both streams;
- generic: descriptions of newly drawn clips (shapes in order, when each sound is heard; no question
  of the task) mixed with text-only conversations about English passages (mmprune/evaluate/transfer.py), one
  record in TEXT_SHARE text-only; the evaluation is the whole held-out split.

Clips are drawn by the synthetic generator of the model's task (basic or hard) from clip seeds
CLIP_SEED_OFFSET + seed * 100,000 + i, far from every seed a data file, training or validation uses,
and encoded to mp4 (H.264 + AAC, as the data files) in a temporary folder, so they reach the model
through the same decoding as the held-out clips.
"""

from __future__ import annotations

import random
from pathlib import Path

from mmprune.evaluate import transfer
from mmprune.base.errors import UserInputError
from videollama2.embedded import synthetic_av as av

CROSS_KIND_CALIBRATION = ("video", "audio")
CROSS_KIND_EVALUATION = ("both",)
# data files and validation use clip seeds below 1e6, training 1e6 + its seed * 1e5 onwards (1.244e8 for the smol parts)
CLIP_SEED_OFFSET = 2_000_000_000
SEEDS_PER_CALIBRATION_SEED = 100_000
MAX_CALIBRATION_SEED = 10_000


def clip_seeds(n: int, seed: int) -> list[int]:
    """The clip seeds of calibration seed `seed`'s n clips (a block of their own per seed)."""
    if not 0 <= seed < MAX_CALIBRATION_SEED or n > SEEDS_PER_CALIBRATION_SEED:
        raise UserInputError(f"the transfer calibration draws clips for seeds 0..{MAX_CALIBRATION_SEED - 1} and "
                             f"at most {SEEDS_PER_CALIBRATION_SEED:,} samples, got seed {seed} and {n} samples; change "
                             "--seeds / --nsamples")
    base = CLIP_SEED_OFFSET + seed * SEEDS_PER_CALIBRATION_SEED
    return [base + i for i in range(n)]


def _clip_record(index: int, name: str, prompt: str, answer: str, **extra) -> dict:
    return {"id": f"transfer_{index:05d}", "video": name, "audio": name,
            "conversations": [{"from": "human", "value": f"<video>\n{prompt}"}, {"from": "gpt", "value": answer}],
            **extra}


def cross_kind_records(n: int, seed: int, variant: str) -> list[tuple[dict, int]]:
    """(record, clip seed) pairs: one video or audio question per clip, kinds in equal shares
    (up to one), in a shuffled order."""
    rng = random.Random(f"transfer:cross-kind:{variant}:{seed}")
    kinds = [CROSS_KIND_CALIBRATION[i % len(CROSS_KIND_CALIBRATION)] for i in range(n)]
    rng.shuffle(kinds)
    out = []
    for index, (kind, clip_seed) in enumerate(zip(kinds, clip_seeds(n, seed))):
        question, answer = av.draw_question(rng, av.draw_spec(clip_seed, variant), kind)
        out.append((_clip_record(index, f"transfer_{index:05d}.mp4", question, answer, kind=kind), clip_seed))
    return out


def description_records(n: int, seed: int, variant: str) -> list[tuple[dict, int]]:
    """(record, clip seed) pairs: one description per clip."""
    rng = random.Random(f"transfer:describe:{variant}:{seed}")
    out = []
    for index, clip_seed in enumerate(clip_seeds(n, seed)):
        prompt, caption = av.describe_clip(rng, av.draw_spec(clip_seed, variant))
        out.append((_clip_record(index, f"transfer_{index:05d}.mp4", prompt, caption), clip_seed))
    return out


def calibration_records(calibration: str, n: int, seed: int, variant: str) -> list[tuple[dict, int | None]]:
    """(record, clip seed or None for a text-only record) pairs of a transfer setting."""
    if calibration == "cross-kind":
        return cross_kind_records(n, seed, variant)
    if calibration == "generic":
        n_media, n_text = transfer.generic_counts(n)
        text = [(record, None) for record in transfer.english_conversations(n_text, seed)]
        return transfer.interleave(description_records(n_media, seed, variant), text, seed)
    raise ValueError(f"no generated calibration set for the {calibration!r} setting")


def write_clips(pairs: list, folder, variant: str) -> list[dict]:
    """Encode each record's clip into `folder` (named as its "video"); returns the records."""
    for record, clip_seed in pairs:
        if clip_seed is not None:
            _, frames, audio = av.make_clip(clip_seed, variant)
            (Path(folder) / record["video"]).write_bytes(av.encode_mp4(frames, audio))
    return [record for record, _ in pairs]


def check_args(calibration: str, nsamples: int, seeds: list) -> None:
    """Before the model loads: the setting can draw nsamples records for every seed."""
    if calibration != "in-task" and nsamples < 1:
        raise UserInputError(f"--nsamples must be at least 1, got {nsamples}")
    if calibration == "in-task":
        return
    for seed in seeds:
        clip_seeds(nsamples, seed)
    if calibration == "generic":
        transfer.check_text_records(transfer.generic_counts(nsamples)[1])


def evaluation_records(records: list, calibration: str) -> list:
    """The held-out records a setting is evaluated on (cross-kind: the kind it did not calibrate on)."""
    return transfer.cross_kind_records(records, calibration, CROSS_KIND_EVALUATION)
