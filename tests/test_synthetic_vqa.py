"""The synthetic VQA generator: deterministic, and every answer can be read off the pixels."""

import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from llava.embedded import paths, synthetic_vqa as vqa


def _components(pixels: np.ndarray, background: np.ndarray) -> list:
    """Connected (4-neighbour) regions of non-background pixels: list of (ys, xs) arrays."""
    mask = np.any(pixels != background, axis=-1)
    seen = np.zeros_like(mask)
    regions = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        queue, ys, xs = deque([(y0, x0)]), [], []
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append((np.array(ys), np.array(xs)))
    return regions


def _describe(pixels: np.ndarray, region) -> dict:
    """Colour (nearest palette entry), shape (from how much of its box it fills) and centre."""
    ys, xs = region
    mean = pixels[ys, xs].mean(axis=0)
    color = min(vqa.COLORS, key=lambda c: np.abs(np.array(vqa.COLORS[c]) - mean).sum())
    fill = len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle"
    return {"color": color, "shape": shape, "cx": xs.mean(), "cy": ys.mean()}


def _answer_from_pixels(sample) -> str:
    """Answer the question using only the drawn image and the question text."""
    pixels = np.asarray(sample.image).astype(int)
    background = pixels[0, 0]  # objects never touch the corner pixel (1 px margin)
    objects = [_describe(pixels, r) for r in _components(pixels, background)]
    words = sample.question.rstrip("?").split()
    if sample.kind == "count":
        return vqa.COUNT_WORDS[len(objects)]
    if sample.kind == "color":
        (match,) = [o for o in objects if o["shape"] in words]
        return match["color"]
    if sample.kind == "shape":
        (match,) = [o for o in objects if o["color"] in words]
        return match["shape"]
    (match,) = [o for o in objects if o["color"] in words and o["shape"] in words]
    height, width = pixels.shape[:2]
    if "left" in words:
        return "left" if match["cx"] < (width - 1) / 2 else "right"
    return "top" if match["cy"] < (height - 1) / 2 else "bottom"


def test_generation_is_deterministic():
    a = vqa.generate("t", 24, seed=3)
    b = vqa.generate("t", 24, seed=3)
    assert [(s.question, s.answer, s.kind) for s in a] == [(s.question, s.answer, s.kind) for s in b]
    assert all(x.image.tobytes() == y.image.tobytes() for x, y in zip(a, b))
    other = vqa.generate("t", 24, seed=4)
    assert [s.image.tobytes() for s in a] != [s.image.tobytes() for s in other]
    assert [s.question for s in vqa.generate("u", 24, seed=3)] != [s.question for s in a]


def test_kinds_balanced_and_sizes_varied():
    samples = vqa.generate("t", 40, seed=0)
    kinds = [s.kind for s in samples]
    assert all(kinds.count(k) == 10 for k in vqa.KINDS)
    sizes = {(s.image.height, s.image.width) for s in samples}
    assert sizes == set(vqa.IMAGE_SIZES)
    assert all(len(s.answer.split()) == 1 for s in samples)


def test_answers_match_what_was_drawn():
    samples = vqa.generate("check", 160, seed=7)
    for s in samples:
        assert _answer_from_pixels(s) == s.answer, (s.question, s.answer, vqa.scene_to_json(s.scene))


def test_position_answers_cover_all_sides():
    answers = {s.answer for s in vqa.generate("t", 200, seed=1) if s.kind == "position"}
    assert answers == {"left", "right", "top", "bottom"}


def test_cli_writes_llava_next_layout(tmp_path):
    assert vqa.main(["--out", str(tmp_path), "--n-calib", "8", "--n-extra", "4", "--n-eval", "6"]) == 0
    raw = tmp_path / "llava_next_raw_format"
    records = json.loads((raw / "llava_next_raw_format_processed.json").read_text())
    split = json.loads((raw / "task_split.json").read_text())
    assert split == {vqa.CALIBRATION_TASK: [0, 8], vqa.EXTRA_TASK: [8, 12]}
    for record in records:
        assert record["conversations"][0]["value"].startswith("<image>\n")
        assert record["conversations"][1]["from"] == "gpt"
        assert record["kind"] in vqa.KINDS
        assert (raw / record["image"]).is_file()
    evals = json.loads((tmp_path / "eval" / "synthvqa_eval.json").read_text())
    assert len(evals) == 6
    assert all((tmp_path / "eval" / "images" / r["image"]).is_file() for r in evals)


def test_cli_rejects_empty_task(capsys, tmp_path):
    assert vqa.main(["--out", str(tmp_path), "--n-calib", "0"]) == 2
    assert "--n-calib" in capsys.readouterr().err


@pytest.mark.skipif(not paths.DATA_PATH.is_file(), reason="embedded data not generated")
def test_committed_data_is_reproducible(tmp_path):
    written = vqa.write_embedded_data(tmp_path)
    for key, committed in (("data_path", paths.DATA_PATH), ("task_split", paths.TASK_SPLIT_PATH),
                           ("eval_path", paths.EVAL_DATA_PATH)):
        assert json.loads(Path(written[key]).read_text()) == json.loads(committed.read_text())
    split = json.loads(paths.TASK_SPLIT_PATH.read_text())
    assert paths.CALIBRATION_TASK in split and len(split) >= 2
    total = sum(f.stat().st_size for f in paths.DATA_ROOT.rglob("*") if f.is_file())
    assert total < 3 * 1024 * 1024
