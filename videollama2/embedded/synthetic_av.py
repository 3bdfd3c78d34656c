"""Deterministic synthetic audio-visual question answering: short mp4 clips with an audio track.

A clip lasts 2 s (16 frames at 8 fps, 64x64, H.264 + AAC at 16 kHz):

- video: a coloured shape (ring, square, triangle; red, green, blue, yellow) moves across a dark
  noisy background during the first second, then a second shape of another colour and another
  kind during the second second;
- audio: a faint noise floor and one sound event, either early (within the first second) or late
  (within the second): a ``hum`` (low tone, 200-300 Hz, with a harmonic), a ``beep`` (high tone,
  1.3-1.9 kHz) or a ``hiss`` (broadband noise).

Questions (one-word answers) come in three kinds:

- ``video`` (needs the frames): "what color is the first shape ?", "what is the second shape ?"
- ``audio`` (needs the sound): "what sound do you hear ?" (hum/beep/hiss),
  "when do you hear the sound ?" (early/late)
- ``both`` (needs both, aligned in time): "what color is the shape during the sound ?",
  "what shape is on screen during the sound ?". The two shapes always differ in colour and kind,
  so a model that sees only the video is right half of the time at best, and one that only hears
  is at chance over four colours or three shapes.

Annotations are written in AVInstruct's raw format ({"video_id", "conversations"}, the question
prefixed with "<video>\\n<Q>") and converted with datasets/transform_to_avinstruct.py's function
into the JSON the loader reads ({"id", "video", "audio", "conversations"}, plus "kind").
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

FPS = 8
SECONDS = 2.0
FRAMES = int(FPS * SECONDS)
SIZE = 64
SAMPLE_RATE = 16000

SHAPES = ("ring", "square", "triangle")
COLORS = {"red": (225, 45, 45), "green": (45, 190, 70), "blue": (55, 95, 240), "yellow": (235, 215, 45)}
SOUNDS = ("hum", "beep", "hiss")
TIMINGS = ("early", "late")
KINDS = ("video", "audio", "both")

QUESTIONS = {
    "video": (("what color is the first shape ?", "color", 0), ("what color is the second shape ?", "color", 1),
              ("what is the first shape ?", "shape", 0), ("what is the second shape ?", "shape", 1)),
    "audio": (("what sound do you hear ?", "sound", None), ("when do you hear the sound ?", "timing", None)),
    "both": (("what color is the shape during the sound ?", "color", "sound"),
             ("what shape is on screen during the sound ?", "shape", "sound")),
}
SAFE_LOW, SAFE_HIGH = 4, 60  # shapes stay inside these pixel bounds


@dataclass
class ShapeSpec:
    shape: str
    color: str
    size: int
    start: tuple[float, float]
    velocity: tuple[float, float]
    rgb: tuple[int, int, int]


@dataclass
class ClipSpec:
    shapes: tuple[ShapeSpec, ShapeSpec]
    sound: str
    timing: str
    sound_start: float
    sound_length: float
    frequency: float
    loudness: float
    background: int
    seed: int

    def frame_shape(self, t: int) -> tuple[int, int]:
        """(index of the shape on screen at frame t, frames since it appeared)."""
        half = FRAMES // 2
        return (0 if t < half else 1), t % half

    def events(self) -> list[tuple[str, float, float, float, float]]:
        """(sound, start s, length s, frequency Hz, loudness) of each sound event."""
        return [(self.sound, self.sound_start, self.sound_length, self.frequency, self.loudness)]

    def questions(self, kind: str) -> list[tuple[str, str]]:
        return [(text, self.answer(attribute, which)) for text, attribute, which in QUESTIONS[kind]]

    def answer(self, attribute: str, which) -> str:
        if attribute == "sound":
            return self.sound
        if attribute == "timing":
            return self.timing
        index = (0 if self.timing == "early" else 1) if which == "sound" else which
        shape = self.shapes[index]
        return shape.color if attribute == "color" else shape.shape


def random_shapes(rng: random.Random, n: int, min_size: int) -> list:
    """`n` shapes of distinct colours and kinds, each with a size, start, velocity and jittered colour."""
    colors = rng.sample(sorted(COLORS), n)
    kinds = rng.sample(SHAPES, n)
    shapes = []
    for color, kind in zip(colors, kinds):
        size = rng.randint(min_size, 28)
        x0 = rng.uniform(SAFE_LOW, SAFE_HIGH - size)
        y0 = rng.uniform(SAFE_LOW, SAFE_HIGH - size)
        speed = rng.uniform(1.0, 3.0)
        angle = rng.uniform(0, 2 * math.pi)
        rgb = tuple(int(np.clip(c + rng.randint(-20, 20), 0, 255)) for c in COLORS[color])
        shapes.append(ShapeSpec(kind, color, size, (x0, y0), (speed * math.cos(angle), speed * math.sin(angle)), rgb))
    return shapes


def draw_clip_spec(rng: random.Random, seed: int) -> ClipSpec:
    shapes = random_shapes(rng, 2, min_size=22)
    sound = rng.choice(SOUNDS)
    timing = rng.choice(TIMINGS)
    length = rng.uniform(0.45, 0.65)
    start = rng.uniform(0.1, 0.9 - length) + (0.0 if timing == "early" else 1.0)
    frequency = rng.uniform(200, 300) if sound == "hum" else rng.uniform(1300, 1900)
    return ClipSpec(tuple(shapes), sound, timing, start, length, frequency, rng.uniform(0.25, 0.5),
                    rng.randint(0, 50), seed)


def _position(shape: ShapeSpec, step: int) -> tuple[float, float]:
    """Top-left corner at frame step, bouncing inside the safe area."""
    coords = []
    for start, velocity in zip(shape.start, shape.velocity):
        span = SAFE_HIGH - shape.size - SAFE_LOW
        value = (start - SAFE_LOW + velocity * step) % (2 * span) if span > 0 else 0.0
        coords.append(SAFE_LOW + (value if value <= span else 2 * span - value))
    return coords[0], coords[1]


def render_frames(spec) -> np.ndarray:
    """(16, 64, 64, 3) uint8 frames; basic task: shape 0 in frames 0-7, shape 1 in frames 8-15."""
    noise_rng = np.random.default_rng(spec.seed)
    frames = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    for t in range(FRAMES):
        index, step = spec.frame_shape(t)
        shape = spec.shapes[index]
        base = noise_rng.normal(spec.background, 6.0, size=(SIZE, SIZE, 1)).repeat(3, axis=2)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        x, y = _position(shape, step)
        s = shape.size
        if shape.shape == "ring":
            draw.ellipse([x, y, x + s, y + s], outline=shape.rgb, width=5)
        elif shape.shape == "square":
            draw.rectangle([x + 2, y + 2, x + s - 2, y + s - 2], fill=shape.rgb)
        else:
            draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=shape.rgb)
        frames[t] = np.asarray(image)
    return frames


def render_audio(spec) -> np.ndarray:
    """(32000,) float32 in [-1, 1]."""
    rng = np.random.default_rng(spec.seed + 1)
    n = int(SECONDS * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    audio = rng.normal(0.0, 0.01, n)
    for sound, start, length, frequency, loudness in spec.events():
        begin, end = int(start * SAMPLE_RATE), int((start + length) * SAMPLE_RATE)
        local = t[begin:end] - t[begin]
        if sound == "hiss":
            event = rng.normal(0.0, 0.5, end - begin)
        elif sound == "hum":
            event = np.sin(2 * np.pi * frequency * local) + 0.4 * np.sin(4 * np.pi * frequency * local)
        else:
            event = np.sin(2 * np.pi * frequency * local)
        ramp = np.minimum(1.0, np.minimum(local, local[-1] - local) / 0.01)  # 10 ms fades
        audio[begin:end] += loudness * event * ramp
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def encode_mp4(frames: np.ndarray, audio: np.ndarray | None, fps: int = FPS,
               sample_rate: int = SAMPLE_RATE) -> bytes:
    """H.264 (yuv420p, I and P frames) video and, if given, a mono AAC track, in an mp4 container.

    No B-frames: with them x264's output differed between processes for the same frames (measured:
    about half the clips of a calibration set), so one seed's transfer calibration did too."""
    import av

    buffer = io.BytesIO()
    container = av.open(buffer, "w", format="mp4")
    video = container.add_stream("libx264", rate=fps)
    video.width, video.height = frames.shape[2], frames.shape[1]
    video.pix_fmt = "yuv420p"
    video.options = {"crf": "26", "preset": "medium", "bf": "0"}
    sound = None
    if audio is not None:
        sound = container.add_stream("aac", rate=sample_rate)
        sound.layout = "mono"
        sound.bit_rate = 32000
    for frame in frames:
        for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in video.encode():
        container.mux(packet)
    if sound is not None:
        for start in range(0, len(audio), 1024):
            chunk = av.AudioFrame.from_ndarray(audio[None, start:start + 1024].astype(np.float32), format="fltp",
                                               layout="mono")
            chunk.sample_rate = sample_rate
            chunk.pts = start
            for packet in sound.encode(chunk):
                container.mux(packet)
        for packet in sound.encode():
            container.mux(packet)
    container.close()
    return buffer.getvalue()


def encode_wav(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def questions_for(spec, kind: str) -> list[tuple[str, str]]:
    """Every (question, answer) of `kind` that the clip answers (either variant)."""
    return spec.questions(kind)


def draw_question(rng: random.Random, spec, kind: str) -> tuple[str, str]:
    return rng.choice(questions_for(spec, kind))


DESCRIBE_PROMPTS = ("Describe the clip.", "What happens in this video?", "Describe what you see and hear.")


def describe_clip(rng: random.Random, spec) -> tuple[str, str]:
    """(prompt, caption): a clip-description turn (not a question of the task) naming the shapes in
    the order they appear and when each sound is heard, for either variant's spec."""
    shapes = [f"a {s.color} {s.shape}" for s in spec.shapes]
    sequence = ", then ".join(shapes)
    seen = (f"{sequence[0].upper()}{sequence[1:]} move across the screen, one after the other." if rng.random() < 0.5
            else f"The clip shows {sequence} crossing a dark screen.")
    if isinstance(spec, HardClipSpec):
        if spec.overlap:
            heard = (f"A {spec.sounds[0].sound} and a {spec.sounds[1].sound} sound together in the "
                     f"{SLOTS[spec.sounds[0].slot]} part.")
        else:
            first, second = sorted(spec.sounds, key=lambda s: s.slot)
            heard = (f"A {first.sound} sounds in the {SLOTS[first.slot]} part and a {second.sound} in the "
                     f"{SLOTS[second.slot]} part.")
    else:
        heard = f"A {spec.sound} sounds {spec.timing} in the clip."
    return rng.choice(DESCRIBE_PROMPTS), f"{seen} {heard}"


def raw_annotation(video_id: str, question: str, answer: str, kind: str) -> dict:
    """One AVInstruct (Bay-CAT) style annotation."""
    return {"video_id": video_id, "kind": kind, "conversations": [
        {"from": "human", "value": f"<video>\n<Q>{question}"}, {"from": "gpt", "value": answer}]}


def vocabulary(variant: str = "basic") -> list[str]:
    """Every word a question or answer of the variant's task can hold."""
    words = set()
    if variant == "hard":
        for templates in HARD_QUESTIONS.values():
            for text in templates:
                words.update(text.format(sound=SOUNDS[0], color=sorted(COLORS)[0], ordinal=ORDINALS[0]).split())
        words.update(SHAPES, COLORS, SOUNDS, SLOTS, ORDINALS, SOUNDS, ("yes", "no", NOTHING))
        return sorted(words)
    for templates in QUESTIONS.values():
        for text, _, _ in templates:
            words.update(text.split())
    words.update(SHAPES, COLORS, SOUNDS, TIMINGS)
    return sorted(words)


# --------------------------------------------------------------------------------------------- hard variant
#
# Three shapes (one of each kind, three of the four colours) in three time slots (early, middle,
# late thirds: frames 0-5, 6-10, 11-15) and two different sounds, each inside one slot; both may
# fall in the same slot and then overlap. Questions still come as video / audio / both, but the
# audio ones need both sounds (which one is missing, whether they overlap, when a named one is
# heard) and the "both" ones need a named sound located in time, or the sound heard while a named
# shape is on screen ("nothing" when none; not asked when two overlap there).

VARIANTS = ("basic", "hard")
SLOTS = ("early", "middle", "late")
ORDINALS = ("first", "second", "third")
NOTHING = "nothing"
SLOT_SECONDS = SECONDS / len(SLOTS)
SLOT_MARGIN = 0.05  # a sound stays this far inside its slot: "during" never straddles two shapes
HARD_QUESTIONS = {
    "video": ("what color is the {ordinal} shape ?", "what is the {ordinal} shape ?"),
    "audio": ("when do you hear the {sound} ?", "which sound is missing ?", "do the sounds overlap ?"),
    "both": ("what color is the shape during the {sound} ?", "what shape is on screen during the {sound} ?",
             "what do you hear during the {color} shape ?"),
}


@dataclass
class SoundSpec:
    sound: str
    slot: int
    start: float
    length: float
    frequency: float
    loudness: float


@dataclass
class HardClipSpec:
    shapes: tuple[ShapeSpec, ShapeSpec, ShapeSpec]
    sounds: tuple[SoundSpec, SoundSpec]
    background: int
    seed: int

    @staticmethod
    def slot_of_frame(t: int) -> int:
        return min(len(SLOTS) - 1, t * len(SLOTS) // FRAMES)

    def frame_shape(self, t: int) -> tuple[int, int]:
        slot = self.slot_of_frame(t)
        first = min(f for f in range(FRAMES) if self.slot_of_frame(f) == slot)
        return slot, t - first

    def events(self) -> list[tuple[str, float, float, float, float]]:
        return [(s.sound, s.start, s.length, s.frequency, s.loudness) for s in self.sounds]

    @property
    def overlap(self) -> bool:
        # two sounds of at least 0.38 s in one slot's usable 0.57 s always overlap
        return self.sounds[0].slot == self.sounds[1].slot

    def questions(self, kind: str) -> list[tuple[str, str]]:
        out = []
        if kind == "video":
            for ordinal, shape in zip(ORDINALS, self.shapes):
                out += [(HARD_QUESTIONS["video"][0].format(ordinal=ordinal), shape.color),
                        (HARD_QUESTIONS["video"][1].format(ordinal=ordinal), shape.shape)]
        elif kind == "audio":
            when, missing, overlap = HARD_QUESTIONS["audio"]
            out += [(when.format(sound=s.sound), SLOTS[s.slot]) for s in self.sounds]
            absent = [s for s in SOUNDS if s not in {e.sound for e in self.sounds}]
            out += [(missing, absent[0]), (overlap, "yes" if self.overlap else "no")]
        elif kind == "both":
            color, shape, heard = HARD_QUESTIONS["both"]
            for s in self.sounds:
                out += [(color.format(sound=s.sound), self.shapes[s.slot].color),
                        (shape.format(sound=s.sound), self.shapes[s.slot].shape)]
            for slot, on_screen in enumerate(self.shapes):
                playing = [s.sound for s in self.sounds if s.slot == slot]
                if len(playing) < 2:
                    out.append((heard.format(color=on_screen.color), playing[0] if playing else NOTHING))
        else:
            raise ValueError(f"unknown question kind {kind!r}")
        return out


def draw_hard_clip_spec(rng: random.Random, seed: int) -> HardClipSpec:
    shapes = random_shapes(rng, 3, min_size=20)
    sounds = []
    for sound in rng.sample(SOUNDS, 2):
        slot = rng.randrange(len(SLOTS))
        # at least 0.36 s: some whole 0.125 s audio clip of the model's 8 (spaced 0.23 s) lies inside
        length = rng.uniform(0.38, 0.5)
        low = slot * SLOT_SECONDS + SLOT_MARGIN
        start = rng.uniform(low, (slot + 1) * SLOT_SECONDS - SLOT_MARGIN - length)
        frequency = rng.uniform(200, 300) if sound == "hum" else rng.uniform(1300, 1900)
        sounds.append(SoundSpec(sound, slot, start, length, frequency, rng.uniform(0.25, 0.5)))
    return HardClipSpec(tuple(shapes), tuple(sounds), rng.randint(0, 50), seed)


# --------------------------------------------------------------------------------------------- data set

CALIB_CLIPS = 128
EVAL_CLIPS = 120
WAV_EVERY = 16  # every 16th calibration clip: silent mp4 + separate wav file as its audio
TRAIN_SEED_OFFSET = 1_000_000  # training clips draw from seeds no data file uses


def draw_spec(seed: int, variant: str = "basic"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown task variant {variant!r}; expected one of {VARIANTS}")
    draw = draw_hard_clip_spec if variant == "hard" else draw_clip_spec
    return draw(random.Random(seed), seed)


def make_clip(seed: int, variant: str = "basic") -> tuple:
    """(spec, frames, audio) of one clip of the variant's task."""
    spec = draw_spec(seed, variant)
    return spec, render_frames(spec), render_audio(spec)


def write_embedded_data(out, seed: int = 0, eval_seed: int | None = None, n_calib: int = CALIB_CLIPS,
                        n_eval: int = EVAL_CLIPS, variant: str = "basic") -> dict:
    """Write the embedded AVInstruct data under `out`:

    - AVQA_music/calib_NNNN.mp4 (+ .wav for every WAV_EVERY-th clip, whose mp4 is silent) and
      AVQA_music/eval_NNNN.mp4;
    - annotations/avinstruct_part{1,2}.json: the calibration questions in AVInstruct's raw format
      (one per clip, kinds in turn);
    - avinstruct_avqa_music.json: those annotations transformed (videollama2.avinstruct), the
      wav clips pointing their "audio" at the wav file;
    - avinstruct_avqa_music_eval.json: held-out clips (another seed), one question of each kind
      per clip.

    `variant` "hard" writes the harder task (default: the basic one of the tiny model).
    """
    from pathlib import Path

    from videollama2.avinstruct import transform, write_json_atomic

    out = Path(out)
    media = out / "AVQA_music"
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    media.mkdir(parents=True, exist_ok=True)
    eval_seed = seed + 1 if eval_seed is None else eval_seed
    rng = random.Random(seed)
    annotations, wav_ids = [], set()
    for i in range(n_calib):
        video_id = f"calib_{i:04d}"
        spec, frames, audio = make_clip(seed * 100_000 + i, variant)
        separate = i % WAV_EVERY == WAV_EVERY - 1
        (media / f"{video_id}.mp4").write_bytes(encode_mp4(frames, None if separate else audio))
        if separate:
            (media / f"{video_id}.wav").write_bytes(encode_wav(audio))
            wav_ids.add(video_id)
        kind = KINDS[i % len(KINDS)]
        question, answer = draw_question(rng, spec, kind)
        annotations.append(raw_annotation(video_id, question, answer, kind))
    half = len(annotations) // 2
    parts = (annotations[:half], annotations[half:])
    for path, part in zip(("avinstruct_part1.json", "avinstruct_part2.json"), parts):
        write_json_atomic(out / "annotations" / path, part)
    records, dropped = transform(annotations, media)
    assert not dropped
    for record in records:
        stem = record["video"][:-4]
        if stem in wav_ids:
            record["audio"] = f"{stem}.wav"
    write_json_atomic(out / "avinstruct_avqa_music.json", records)

    eval_rng = random.Random(eval_seed)
    eval_annotations = []
    for i in range(n_eval):
        video_id = f"eval_{i:04d}"
        spec, frames, audio = make_clip(eval_seed * 100_000 + i, variant)
        (media / f"{video_id}.mp4").write_bytes(encode_mp4(frames, audio))
        for kind in KINDS:
            question, answer = draw_question(eval_rng, spec, kind)
            eval_annotations.append(raw_annotation(video_id, question, answer, kind))
    eval_records, _ = transform(eval_annotations, media)
    write_json_atomic(out / "avinstruct_avqa_music_eval.json", eval_records)
    return {"data_path": out / "avinstruct_avqa_music.json", "eval_path": out / "avinstruct_avqa_music_eval.json",
            "media": media, "calibration_records": len(records), "eval_records": len(eval_records)}


def main(argv=None) -> int:
    import argparse

    from videollama2.embedded import layout

    parser = argparse.ArgumentParser(prog="python -m videollama2.embedded.synthetic_av",
                                     description="Write the synthetic audio-visual QA data of the embedded default.")
    parser.add_argument("--out", default=None,
                        help=f"output root (default: {layout.DATA_ROOT} for basic, {layout.HARD_DATA_ROOT} for hard)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=None, help="seed of the held-out split (default: seed + 1)")
    parser.add_argument("--n-calib", type=int, default=CALIB_CLIPS)
    parser.add_argument("--n-eval", type=int, default=EVAL_CLIPS)
    parser.add_argument("--variant", choices=VARIANTS, default="basic",
                        help="task: basic (the tiny model's, default) or hard (three shapes, two sounds)")
    args = parser.parse_args(argv)
    if args.n_calib < 1 or args.n_eval < 1:
        print("error: --n-calib and --n-eval must be at least 1", flush=True)
        return 2
    # each variant has its own default folder: the hard task never overwrites the basic data
    out = args.out or (layout.HARD_DATA_ROOT if args.variant == "hard" else layout.DATA_ROOT)
    written = write_embedded_data(out, args.seed, args.eval_seed, args.n_calib, args.n_eval, args.variant)
    for name, value in written.items():
        print(f"{name}: {value}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
