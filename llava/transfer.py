"""Calibration sets of the transfer settings of `python -m llava.quality --calibration` for the
embedded LLaVA-NeXT (docs/method.md, "Calibration settings of the quality grids").

- cross-kind: single colour and shape questions about newly drawn images; the evaluation keeps only
  the held-out count and position questions;
- generic: descriptions of newly drawn images (no question of the task) mixed with text-only
  conversations about English passages (mmprune/evaluate/transfer.py), one record in TEXT_SHARE text-only;
  the evaluation is the whole held-out split.

Everything is drawn from the calibration seed with the synthetic generator's own random streams
(task names no data file uses), in memory: no file is written, and a seed always gives the same
records and pixels.
"""

from __future__ import annotations

from PIL import Image

from llava.embedded import synthetic_vqa as vqa
from mmprune.evaluate import transfer
from mmprune.base.errors import UserInputError

CROSS_KIND_CALIBRATION = ("color", "shape")
CROSS_KIND_EVALUATION = ("count", "position")
CROSS_KIND_TASK = "transfer_cross_kind"
DESCRIBE_TASK = "transfer_describe"


def cross_kind_samples(n: int, seed: int) -> list[tuple[dict, Image.Image]]:
    """(record, image) pairs: n single questions, colour and shape in equal shares (up to one), in a
    shuffled order."""
    rng = vqa.task_rng(CROSS_KIND_TASK, seed)
    kinds = [CROSS_KIND_CALIBRATION[i % len(CROSS_KIND_CALIBRATION)] for i in range(n)]
    rng.shuffle(kinds)
    out = []
    for index, kind in enumerate(kinds):
        sample = vqa.make_sample(rng, kind)
        out.append((vqa.to_record(sample, CROSS_KIND_TASK, index), sample.image))
    return out


def description_samples(n: int, seed: int) -> list[tuple[dict, Image.Image]]:
    """(record, image) pairs: n image descriptions of 1-3 object scenes."""
    rng = vqa.task_rng(DESCRIBE_TASK, seed)
    out = []
    while len(out) < n:
        scene = vqa.random_scene(rng, rng.randint(1, vqa.MAX_OBJECTS))
        if scene is None:
            continue
        prompt, caption = vqa.describe_scene(rng, scene)
        index = len(out)
        record = {"id": f"{DESCRIBE_TASK}_{index:05d}", "image": f"{DESCRIBE_TASK}/{index:05d}.png",
                  "conversations": [{"from": "human", "value": f"<image>\n{prompt}"},
                                    {"from": "gpt", "value": caption}],
                  "objects": vqa.scene_to_json(scene)}
        out.append((record, vqa.render(scene)))
    return out


def generic_samples(n: int, seed: int) -> list[tuple[dict, Image.Image | None]]:
    """(record, image or None) pairs: descriptions and text-only conversations, mixed."""
    n_media, n_text = transfer.generic_counts(n)
    text = [(record, None) for record in transfer.english_conversations(n_text, seed)]
    return transfer.interleave(description_samples(n_media, seed), text, seed)


def calibration_samples(calibration: str, n: int, seed: int) -> list[tuple[dict, Image.Image | None]]:
    if calibration == "cross-kind":
        return cross_kind_samples(n, seed)
    if calibration == "generic":
        return generic_samples(n, seed)
    raise ValueError(f"no generated calibration set for the {calibration!r} setting")


def check_args(calibration: str, nsamples: int, seeds: list) -> None:
    """Before the model loads: the setting can draw nsamples records for every seed."""
    if calibration != "in-task" and nsamples < 1:
        raise UserInputError(f"--nsamples must be at least 1, got {nsamples}")
    if calibration == "generic":
        transfer.check_text_records(transfer.generic_counts(nsamples)[1])


def evaluation_records(records: list, calibration: str) -> list:
    """The held-out records a setting is evaluated on (cross-kind: the kinds it did not calibrate on)."""
    return transfer.cross_kind_records(records, calibration, CROSS_KIND_EVALUATION)
