"""The synthetic AV task (videollama2/embedded/synthetic_av.py): the basic task is unchanged, and
the "hard" variant's answers follow from what is drawn and heard."""

import hashlib
import json
import random
from fractions import Fraction

import numpy as np
import pytest

from videollama2.embedded import paths, synthetic_av as av


def test_basic_task_still_gives_the_committed_eval_questions():
    records = json.loads(paths.EVAL_DATA_PATH.read_text())
    rng = random.Random(1)  # write_embedded_data's eval seed for seed 0
    expected = []
    for i in range(len(records) // len(av.KINDS)):
        spec = av.draw_spec(1 * 100_000 + i)
        for kind in av.KINDS:
            expected.append((f"eval_{i:04d}.mp4", kind) + av.draw_question(rng, spec, kind))
    got = [(r["video"], r["kind"], r["conversations"][0]["value"].split("\n", 1)[1], r["conversations"][1]["value"])
           for r in records]
    assert got == expected


def test_basic_task_media_are_unchanged():
    # frames, audio and questions of the basic task as before the hard variant existed
    digest = hashlib.sha256()
    for seed in (0, 1, 5, 100001):
        _, frames, audio = av.make_clip(seed)
        digest.update(frames.tobytes())
        digest.update(audio.tobytes())
    rng = random.Random(3)
    for seed in range(20):
        spec = av.draw_clip_spec(random.Random(seed), seed)
        for kind in av.KINDS:
            digest.update(repr(av.draw_question(rng, spec, kind)).encode())
    assert digest.hexdigest() == "eb520cf80876ff7ad9d3046b87e6a62d24db0ce0f1cc50793001b8fae2ecfc24"


def test_hard_specs_keep_their_promises():
    overlaps = 0
    for seed in range(400):
        spec = av.draw_spec(seed, "hard")
        assert sorted(s.shape for s in spec.shapes) == sorted(av.SHAPES)
        assert len({s.color for s in spec.shapes}) == 3
        assert len({s.sound for s in spec.sounds}) == 2
        intervals = []
        for sound in spec.sounds:
            low, high = sound.slot * av.SLOT_SECONDS, (sound.slot + 1) * av.SLOT_SECONDS
            assert low + av.SLOT_MARGIN <= sound.start and sound.start + sound.length <= high - av.SLOT_MARGIN + 1e-9
            intervals.append((sound.start, sound.start + sound.length))
            # some 0.125 s audio clip the model hears (pytorchvideo spacing, 8 clips) lies inside the sound
            step = Fraction(av.SECONDS - 0.125) / 8
            assert any(sound.start <= float(step * k) and float(step * k) + 0.125 <= sound.start + sound.length
                       for k in range(8)), (seed, sound)
        (a0, a1), (b0, b1) = intervals
        assert spec.overlap == (a0 < b1 and b0 < a1)
        overlaps += spec.overlap
    assert 0.2 < overlaps / 400 < 0.45


def test_hard_questions_and_answers():
    spec = av.draw_spec(7, "hard")
    first, second = spec.sounds
    video = dict(spec.questions("video"))
    assert video["what is the third shape ?"] == spec.shapes[2].shape
    assert video["what color is the first shape ?"] == spec.shapes[0].color
    audio = dict(spec.questions("audio"))
    assert audio[f"when do you hear the {first.sound} ?"] == av.SLOTS[first.slot]
    assert audio["which sound is missing ?"] not in {first.sound, second.sound}
    assert audio["do the sounds overlap ?"] == ("yes" if first.slot == second.slot else "no")
    both = dict(spec.questions("both"))
    assert both[f"what shape is on screen during the {second.sound} ?"] == spec.shapes[second.slot].shape
    for slot, shape in enumerate(spec.shapes):
        playing = [s.sound for s in spec.sounds if s.slot == slot]
        question = f"what do you hear during the {shape.color} shape ?"
        if len(playing) == 2:
            assert question not in both  # two overlapping sounds: no single answer
        else:
            assert both[question] == (playing[0] if playing else av.NOTHING)
    words = set(av.vocabulary("hard"))
    for kind in av.KINDS:
        for question, answer in spec.questions(kind):
            assert set(question.split()) <= words and answer in words


def test_hard_clip_shows_each_shape_in_its_slot_and_plays_each_sound_in_its_interval():
    spec, frames, audio = av.make_clip(11, "hard")
    for t in range(av.FRAMES):
        shape = spec.shapes[av.HardClipSpec.slot_of_frame(t)]
        pixels = frames[t].reshape(-1, 3).astype(float)
        coloured = pixels[np.abs(pixels - np.array(shape.rgb)).max(1) < 40]
        assert len(coloured) > 40, t  # the slot's shape is painted in its own colour
        for other in spec.shapes:
            if other is not shape:
                assert (np.abs(pixels - np.array(other.rgb)).max(1) < 15).sum() < 10
    assert [av.HardClipSpec.slot_of_frame(t) for t in range(16)] == [0] * 6 + [1] * 5 + [2] * 5
    rms = lambda a, b: float(np.sqrt(np.mean(audio[int(a * av.SAMPLE_RATE):int(b * av.SAMPLE_RATE)] ** 2)))
    for sound in spec.sounds:
        assert rms(sound.start + 0.02, sound.start + sound.length - 0.02) > 0.1
    quiet = [slot for slot in range(3) if all(s.slot != slot for s in spec.sounds)]
    for slot in quiet:
        assert rms(slot * av.SLOT_SECONDS, (slot + 1) * av.SLOT_SECONDS) < 0.02


def test_hard_data_set_is_written_in_the_loader_format(tmp_path):
    from videollama2.data import load_records
    from videollama2.media import MediaLoader

    written = av.write_embedded_data(tmp_path, n_calib=3, n_eval=2, variant="hard")
    records = load_records(written["eval_path"])
    assert [r["kind"] for r in records] == list(av.KINDS) * 2
    calib = load_records(written["data_path"])
    assert len(calib) == 3
    loader = MediaLoader(num_frames=8, image_size=64, audio_seconds=1.0, audio_clips=8, audio_clip_seconds=0.125)
    assert tuple(loader.video(written["media"] / records[0]["video"]).shape) == (8, 3, 64, 64)
    with pytest.raises(ValueError, match="variant"):
        av.make_clip(0, "harder")


def test_hard_variant_defaults_to_its_own_folder(monkeypatch):
    written = {}

    def record(out, *rest):  # stands in for the writer: only the folder matters here
        written["out"] = out
        return {}

    monkeypatch.setattr(av, "write_embedded_data", record)
    assert av.main(["--variant", "hard", "--n-calib", "1", "--n-eval", "1"]) == 0
    assert written["out"] == paths.HARD_DATA_ROOT
    written.clear()
    assert av.main(["--n-calib", "1", "--n-eval", "1"]) == 0
    assert written["out"] == paths.DATA_ROOT
