"""Deterministic synthetic visual question answering (shapes and colours), drawn with PIL.

Every image holds 1-3 flat shapes (circle, square, triangle) in four colours on a plain light
background; every question needs the image and has a one-word answer:

- ``color``:    "what color is the circle?"                  -> red / green / blue / yellow
- ``shape``:    "what shape is the blue object?"             -> circle / square / triangle
- ``count``:    "how many shapes are there?"                 -> one / two / three
- ``position``: "is the red square on the left or the right?" -> left / right (or top / bottom)

Scenes are built so that each question has exactly one correct answer: the asked-about shape or
colour is unique in the image, no two objects share a (colour, shape) pair, objects never touch,
and an object asked about for its position sits clearly off the middle line.

Image sizes (H x W) 64x64, 48x64 and 64x48 all pick the 64x64 anyres pinpoint of the tiny model,
so the non-square ones exercise LLaVA-NeXT's unpadding.

Output is LLaVA-NeXT raw format (a JSON list of records whose ``image`` path starts with the task
name). ``python -m llava.embedded.synthetic_vqa --out DIR`` writes the embedded default data set.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 195, 30),
}
IMAGE_SIZES = ((64, 64), (48, 64), (64, 48))  # (height, width)
KINDS = ("color", "shape", "count", "position")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
MAX_OBJECTS = 3

MIN_SIZE, MAX_SIZE = 14, 20  # object side in pixels
GAP = 3  # minimum empty pixels between two objects, so they never merge
POSITION_MARGIN = 5  # an object asked about must be this far off the middle line
COLOR_JITTER = 15  # per-channel noise on object colours, so colour is not one exact value

QUESTION_TEMPLATES = {
    "color": ("what color is the {shape}?", "which color does the {shape} have?"),
    "shape": ("what shape is the {color} object?", "which shape is {color}?"),
    "count": ("how many shapes are there?", "how many objects are in the image?"),
    "horizontal": ("is the {color} {shape} on the left or the right?",),
    "vertical": ("is the {color} {shape} at the top or the bottom?",),
}

# Calibration pool and a second task for the embedded default (see write_embedded_data).
CALIBRATION_TASK = "sharegpt4v"
EXTRA_TASK = "synthvqa_extra"
EVAL_TASK = "synthvqa_eval"
DEFAULT_COUNTS = {CALIBRATION_TASK: 256, EXTRA_TASK: 64}
DEFAULT_EVAL_COUNT = 300


@dataclass(frozen=True)
class Obj:
    """One drawn object: its attributes and its square bounding box (x0, y0, side)."""

    shape: str
    color: str
    rgb: tuple
    x0: int
    y0: int
    size: int

    @property
    def center(self) -> tuple:
        return (self.x0 + (self.size - 1) / 2, self.y0 + (self.size - 1) / 2)


@dataclass(frozen=True)
class Scene:
    height: int
    width: int
    background: tuple
    objects: tuple


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str
    kind: str
    scene: Scene


def task_rng(task: str, seed: int) -> random.Random:
    """A generator per (task, seed): tasks drawn with the same seed still differ.

    String seeds are hashed with SHA-512 by `random`, so this is stable across runs and
    independent of PYTHONHASHSEED.
    """
    return random.Random(f"synthvqa:{task}:{seed}")


def _jitter(rng: random.Random, rgb: tuple) -> tuple:
    return tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for c in rgb)


def _separated(a: tuple, b: tuple) -> bool:
    """True when boxes (x0, y0, side) are at least GAP pixels apart on some axis."""
    ax, ay, asz = a
    bx, by, bsz = b
    return (ax + asz + GAP <= bx or bx + bsz + GAP <= ax
            or ay + asz + GAP <= by or by + bsz + GAP <= ay)


def _place_boxes(rng: random.Random, n: int, height: int, width: int) -> list | None:
    """n non-touching square boxes inside the image, or None if rejection sampling gave up."""
    boxes = []
    for _ in range(n):
        for _attempt in range(50):
            size = rng.randint(MIN_SIZE, MAX_SIZE)
            box = (rng.randint(1, width - size - 1), rng.randint(1, height - size - 1), size)
            if all(_separated(box, other) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _random_attributes(rng: random.Random, n: int) -> list:
    """n distinct (shape, colour) pairs."""
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    return rng.sample(pairs, n)


def random_scene(rng: random.Random, n_objects: int) -> Scene | None:
    height, width = rng.choice(IMAGE_SIZES)
    boxes = _place_boxes(rng, n_objects, height, width)
    if boxes is None:
        return None
    grey = rng.randint(225, 255)
    objects = tuple(
        Obj(shape, color, _jitter(rng, COLORS[color]), x0, y0, size)
        for (shape, color), (x0, y0, size) in zip(_random_attributes(rng, n_objects), boxes)
    )
    return Scene(height, width, (grey, grey, grey), objects)


def _unique(objects: tuple, attr: str) -> list:
    """Objects whose value of `attr` (shape or color) occurs once in the scene."""
    values = [getattr(o, attr) for o in objects]
    return [o for o in objects if values.count(getattr(o, attr)) == 1]


def _position_answer(obj: Obj, scene: Scene, axis: str) -> str | None:
    cx, cy = obj.center
    if axis == "horizontal":
        offset = cx - (scene.width - 1) / 2
        names = ("left", "right")
    else:
        offset = cy - (scene.height - 1) / 2
        names = ("top", "bottom")
    if abs(offset) < POSITION_MARGIN:
        return None  # too close to the middle: the answer would be ambiguous
    return names[0] if offset < 0 else names[1]


def _color_question(rng: random.Random, obj: Obj) -> tuple:
    return rng.choice(QUESTION_TEMPLATES["color"]).format(shape=obj.shape), obj.color


def _shape_question(rng: random.Random, obj: Obj) -> tuple:
    return rng.choice(QUESTION_TEMPLATES["shape"]).format(color=obj.color), obj.shape


def _position_question(rng: random.Random, obj: Obj, scene: Scene, axis: str) -> tuple | None:
    answer = _position_answer(obj, scene, axis)
    if answer is None:
        return None
    return rng.choice(QUESTION_TEMPLATES[axis]).format(color=obj.color, shape=obj.shape), answer


def ask(rng: random.Random, kind: str, scene: Scene) -> tuple | None:
    """(question, answer) of the given kind about the scene, or None if it has no clean one."""
    if kind == "color":
        candidates = _unique(scene.objects, "shape")
        return _color_question(rng, rng.choice(candidates)) if candidates else None
    if kind == "shape":
        candidates = _unique(scene.objects, "color")
        return _shape_question(rng, rng.choice(candidates)) if candidates else None
    if kind == "count":
        return rng.choice(QUESTION_TEMPLATES["count"]), COUNT_WORDS[len(scene.objects)]
    if kind == "position":
        obj = rng.choice(scene.objects)
        return _position_question(rng, obj, scene, rng.choice(("horizontal", "vertical")))
    raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")


def _draw(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    x1, y1 = o.x0 + o.size - 1, o.y0 + o.size - 1
    if o.shape == "circle":
        draw.ellipse([o.x0, o.y0, x1, y1], fill=fill)
    elif o.shape == "square":
        draw.rectangle([o.x0, o.y0, x1, y1], fill=fill)
    else:  # triangle pointing up, apex at the top middle of the box
        draw.polygon([((o.x0 + x1) / 2, o.y0), (x1, y1), (o.x0, y1)], fill=fill)


def render(scene: Scene) -> Image.Image:
    """Draw the scene; no anti-aliasing, so PNGs stay tiny and colours stay exact."""
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        _draw(draw, o, o.rgb)
    return image


def object_masks(scene: Scene) -> np.ndarray:
    """(objects, height, width) booleans: the pixels `render` paints for each object."""
    masks = np.zeros((len(scene.objects), scene.height, scene.width), dtype=bool)
    for i, o in enumerate(scene.objects):
        canvas = Image.new("L", (scene.width, scene.height), 0)
        _draw(ImageDraw.Draw(canvas), o, 255)
        masks[i] = np.asarray(canvas) > 0
    return masks


def make_sample(rng: random.Random, kind: str) -> Sample:
    """One sample of the given kind; redraws scenes until the question is well defined."""
    while True:
        scene = random_scene(rng, rng.randint(1, MAX_OBJECTS))
        if scene is None:
            continue
        qa = ask(rng, kind, scene)
        if qa is not None:
            return Sample(render(scene), qa[0], qa[1], kind, scene)


def generate(task: str, n: int, seed: int) -> list:
    """n samples, kinds exactly balanced (up to n mod 4) in a shuffled order."""
    rng = task_rng(task, seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    return [make_sample(rng, kind) for kind in kinds]


def iter_samples(task: str, seed: int):
    """An endless stream of samples (for training), kinds cycled in shuffled blocks of four."""
    rng = task_rng(task, seed)
    while True:
        kinds = list(KINDS)
        rng.shuffle(kinds)
        for kind in kinds:
            yield make_sample(rng, kind)


def scene_questions(rng: random.Random, scene: Scene) -> list:
    """Every clean question about the scene that no other one gives away, as (question, answer,
    kind) in a valid order: the count, one colour-or-shape question per object whose asked-by
    attribute is unique, then positions (each object on each axis, where it is off the middle).

    Colour and shape questions come first because position questions name the object's colour and
    shape, and an object gets only one of them because each answer names the other attribute. The
    count is shuffled in with them: turns before it can name some objects, a lower bound on it."""
    first = [(*ask(rng, "count", scene), "count")]
    unique_shape, unique_color = _unique(scene.objects, "shape"), _unique(scene.objects, "color")
    later = []
    for obj in scene.objects:
        kinds = [k for k, ok in (("color", obj in unique_shape), ("shape", obj in unique_color)) if ok]
        if kinds:
            kind = rng.choice(kinds)
            first.append((*(_color_question if kind == "color" else _shape_question)(rng, obj), kind))
        for axis in ("horizontal", "vertical"):
            qa = _position_question(rng, obj, scene, axis)
            if qa is not None:
                later.append((*qa, "position"))
    rng.shuffle(first)
    rng.shuffle(later)
    return first + later


def make_conversation(rng: random.Random, max_objects: int, max_turns: int) -> tuple:
    """(scene, [(question, answer, kind), ...]) for multi-turn training conversations.

    1..max_turns questions about one scene of 1..max_objects objects, a random subset of
    `scene_questions` kept in its order, so no colour, shape or position turn can be answered from
    an earlier question or answer: several answers per image give more supervision per forward pass
    (the image tokens dominate).
    """
    while True:
        scene = random_scene(rng, rng.randint(1, max_objects))
        if scene is None:
            continue
        questions = scene_questions(rng, scene)
        chosen = sorted(rng.sample(range(len(questions)), min(len(questions), rng.randint(1, max_turns))))
        return scene, [questions[i] for i in chosen]


DESCRIBE_PROMPTS = ("Describe the image.", "What is in this picture?", "Give a short description of the image.")


def _place_words(obj: Obj, scene: Scene) -> str:
    """Where an object sits, in words: "at the top left", "on the right", "in the middle"."""
    horizontal = _position_answer(obj, scene, "horizontal")
    vertical = _position_answer(obj, scene, "vertical")
    if horizontal and vertical:
        return f"at the {vertical} {horizontal}"
    if horizontal:
        return f"on the {horizontal}"
    return f"at the {vertical}" if vertical else "in the middle"


def describe_scene(rng: random.Random, scene: Scene) -> tuple:
    """(prompt, caption): an image-description turn (not a question of the VQA task), naming each
    object's colour, shape and place, in one of two sentence forms."""
    items = [f"a {o.color} {o.shape} {_place_words(o, scene)}" for o in scene.objects]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    n = len(scene.objects)
    if rng.random() < 0.5:
        amount = "a single shape" if n == 1 else f"{COUNT_WORDS[n]} shapes"
        caption = f"The image shows {amount} on a plain light background: {listed}."
    else:
        caption = f"{listed[0].upper()}{listed[1:]} {'stands' if n == 1 else 'stand'} on a plain light background."
    return rng.choice(DESCRIBE_PROMPTS), caption


def conversation_record(turns: list, task: str, index: int) -> dict:
    """A multi-turn raw-format record; the image placeholder opens the first question."""
    conversations = []
    for i, (question, answer, _kind) in enumerate(turns):
        conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": f"{task}_{index:05d}", "image": f"{task}/{index:05d}.png",
            "conversations": conversations, "kind": turns[-1][2]}


def scene_to_json(scene: Scene) -> list:
    """Compact object list kept in each record, so tests can check answers against drawings."""
    return [{"shape": o.shape, "color": o.color, "box": [o.x0, o.y0, o.size]} for o in scene.objects]


def to_record(sample: Sample, task: str, index: int) -> dict:
    """A LLaVA-NeXT raw-format record; `image` is relative to the image folder."""
    return {
        "id": f"{task}_{index:05d}",
        "image": f"{task}/{index:05d}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{sample.question}"},
            {"from": "gpt", "value": sample.answer},
        ],
        "kind": sample.kind,
        "objects": scene_to_json(sample.scene),
    }


def write_task(task: str, n: int, seed: int, image_folder: Path) -> list:
    """Draw n samples of `task`, save their PNGs under image_folder/task, return the records."""
    (image_folder / task).mkdir(parents=True, exist_ok=True)
    records = []
    for index, sample in enumerate(generate(task, n, seed)):
        record = to_record(sample, task, index)
        # optimize=True keeps the committed PNGs at a few hundred bytes each
        sample.image.save(image_folder / record["image"], optimize=True)
        records.append(record)
    return records


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def write_embedded_data(out: Path, seed: int = 0, eval_seed: int | None = None,
                        counts: dict | None = None, n_eval: int = DEFAULT_EVAL_COUNT) -> dict:
    """Write the embedded LLaVA-NeXT-Data tree under `out`; returns the written paths.

    Tasks are written as contiguous runs (calibration pool first) and task_split.json is derived
    from the file exactly as for real data. The eval split uses a different seed and task name.
    """
    # imported here: llava.pruners is a sibling package that may import heavier modules
    from llava.pruners.split_finetune_llava_next import write_task_split

    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    eval_seed = seed + 1 if eval_seed is None else eval_seed
    raw_dir = out / "llava_next_raw_format"
    records = []
    for task, n in counts.items():
        records += write_task(task, n, seed, raw_dir)
    data_path = raw_dir / "llava_next_raw_format_processed.json"
    write_json(data_path, records)
    split_path = raw_dir / "task_split.json"
    write_task_split(data_path, split_path)

    eval_dir = out / "eval"
    eval_records = write_task(EVAL_TASK, n_eval, eval_seed, eval_dir / "images")
    eval_path = eval_dir / "synthvqa_eval.json"
    write_json(eval_path, eval_records)
    return {"data_path": data_path, "task_split": split_path, "eval_path": eval_path}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llava.embedded.synthetic_vqa",
        description="Write the synthetic shapes-and-colours VQA data in LLaVA-NeXT raw format.")
    parser.add_argument("--out", required=True, type=Path,
                        help="output root, e.g. playground/embedded/LLaVA-NeXT-Data")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration tasks")
    parser.add_argument("--eval-seed", type=int, default=None,
                        help="seed of the held-out eval split (default: seed + 1)")
    parser.add_argument("--n-calib", type=int, default=DEFAULT_COUNTS[CALIBRATION_TASK],
                        help=f"samples in the {CALIBRATION_TASK!r} task")
    parser.add_argument("--n-extra", type=int, default=DEFAULT_COUNTS[EXTRA_TASK],
                        help=f"samples in the {EXTRA_TASK!r} task")
    parser.add_argument("--n-eval", type=int, default=DEFAULT_EVAL_COUNT,
                        help="samples in the eval split")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("n_calib", "n_extra", "n_eval"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    counts = {CALIBRATION_TASK: args.n_calib, EXTRA_TASK: args.n_extra}
    paths = write_embedded_data(args.out, args.seed, args.eval_seed, counts, args.n_eval)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
