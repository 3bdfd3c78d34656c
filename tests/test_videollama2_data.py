"""AVInstruct transform, record loading, calibration draw and prompt encoding for VideoLLaMA2-AV."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fixtures_videollama2 import write_clip
from mmprune.base.errors import UserInputError
from videollama2.data import (
    collate, conversation_segments, encode_record, load_records, normalized_turns, select_samples,
)
from videollama2.embedded import tiny
from videollama2.media import MediaLoader
from videollama2.model import AUDIO_TOKEN_INDEX, IGNORE_INDEX, VIDEO_TOKEN_INDEX

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "datasets" / "transform_to_avinstruct.py"


def annotation(video_id, question="what color is the first shape ?", answer="red"):
    return {"video_id": video_id, "conversations": [
        {"from": "human", "value": f"<Q>{question} <video>"}, {"from": "gpt", "value": answer}]}


def run_transform(tmp_path, part1, part2, video_dir=None, save=None):
    (tmp_path / "a.json").write_text(json.dumps(part1))
    (tmp_path / "b.json").write_text(json.dumps(part2))
    save = save or tmp_path / "out.json"
    return subprocess.run([sys.executable, str(SCRIPT), "--video_dir", str(video_dir or tmp_path / "videos"),
                           "--dataset_path1", str(tmp_path / "a.json"), "--dataset_path2", str(tmp_path / "b.json"),
                           "--save_path", str(save)], capture_output=True, text=True, cwd=tmp_path), save


def test_transform_drops_missing_videos_and_says_how_many(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("v1", "v3", "v4"):
        (videos / f"{name}.mp4").write_bytes(b"x")
    proc, out = run_transform(tmp_path, [annotation("v1"), annotation("v2")], [annotation("v3"), annotation("v4"),
                                                                               annotation("v5")])
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 records" in proc.stdout and "dropped 2 of 5" in proc.stdout and "v2" in proc.stdout
    records = json.loads(out.read_text())
    assert [r["video"] for r in records] == ["v1.mp4", "v3.mp4", "v4.mp4"]
    assert records[0] == {"id": 0, "audio": "v1.mp4", "video": "v1.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhat color is the first shape ?"}, {"from": "gpt", "value": "red"}]}
    assert [r["id"] for r in records] == [0, 1, 2]


@pytest.mark.parametrize("case", ["missing_annotations", "no_video_found", "not_json"])
def test_transform_errors_write_nothing(tmp_path, case):
    (tmp_path / "videos").mkdir()
    if case == "missing_annotations":
        save = tmp_path / "out.json"
        proc = subprocess.run([sys.executable, str(SCRIPT), "--video_dir", str(tmp_path / "videos"),
                               "--dataset_path1", str(tmp_path / "nope.json"), "--dataset_path2",
                               str(tmp_path / "nope2.json"), "--save_path", str(save)], capture_output=True, text=True)
        needle = "nope.json does not exist"
    elif case == "no_video_found":
        proc, save = run_transform(tmp_path, [annotation("v1")], [annotation("v2")])
        needle = "none of the 2 annotations"
    else:
        (tmp_path / "a.json").write_text("[{")
        (tmp_path / "b.json").write_text("[]")
        save = tmp_path / "out.json"
        proc = subprocess.run([sys.executable, str(SCRIPT), "--video_dir", str(tmp_path / "videos"), "--dataset_path1",
                               str(tmp_path / "a.json"), "--dataset_path2", str(tmp_path / "b.json"),
                               "--save_path", str(save)], capture_output=True, text=True)
        needle = "not valid JSON"
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last
    assert not save.exists() and not list(tmp_path.glob(".out.json*"))


def test_select_samples_is_the_public_codes_draw():
    records = [{"id": i} for i in range(50)]
    np.random.seed(42)
    expected = np.random.choice(np.arange(50), size=10, replace=False)
    assert [r["id"] for r in select_samples(records, 10, 42)] == expected.tolist()
    with pytest.raises(UserInputError, match="--nsamples 50 or fewer"):
        select_samples(records, 51, 0)


def test_placeholder_moves_to_the_front_of_the_first_human_turn():
    record = {"video": "a.mp4", "audio": "a.mp4", "conversations": [
        {"from": "human", "value": "what is it? <video>"}, {"from": "gpt", "value": "a cat"},
        {"from": "human", "value": "and <video> now?"}, {"from": "gpt", "value": "a dog"}]}
    turns = normalized_turns(record)
    assert turns[0]["content"] == "<video>\nwhat is it?" and turns[2]["content"] == "and  now?"
    audio_only = normalized_turns({"audio": "a.wav", "conversations": [{"from": "human", "value": "hear?"}]})
    assert audio_only[0]["content"] == "<audio>\nhear?"
    with pytest.raises(UserInputError, match="placeholder"):
        normalized_turns({"conversations": [{"from": "human", "value": "<video> what?"}]})


def test_encoding_labels_only_answers_and_end_of_turn(tmp_path):
    tokenizer = tiny.build_tokenizer()
    write_clip(tmp_path / "c.mp4", seed=2)
    record = {"id": 0, "video": "c.mp4", "audio": "c.mp4", "conversations": [
        {"from": "human", "value": "<video>\nwhat sound do you hear ?"}, {"from": "gpt", "value": "hum"},
        {"from": "human", "value": "when do you hear the sound ?"}, {"from": "gpt", "value": "late"}]}
    loader = MediaLoader(num_frames=4, image_size=70, audio_seconds=0.55, audio_clips=8, audio_clip_seconds=0.0625)
    encoded = encode_record(tokenizer, record, tmp_path, loader)
    ids, labels = encoded["input_ids"][0].tolist(), encoded["labels"][0].tolist()
    assert ids.count(VIDEO_TOKEN_INDEX) == 1 and AUDIO_TOKEN_INDEX not in ids
    labelled = [tokenizer.convert_ids_to_tokens(t) for t in labels if t != IGNORE_INDEX]
    assert labelled == ["hum", "<|im_end|>", "late", "<|im_end|>"]
    text = tokenizer.decode([t for t in ids if t >= 0])
    assert text.startswith("<|im_start|> system you are a helpful assistant. <|im_end|> <|im_start|> user what sound")
    assert encoded["video"].shape == (1, 4, 3, 70, 70) and encoded["audio"].shape == (1, 53, 128)
    prompt = encode_record(tokenizer, record, tmp_path, loader, with_answer=False)
    assert prompt["input_ids"].shape[1] == len(ids) - 2  # without the last answer and its <|im_end|>
    assert tokenizer.convert_ids_to_tokens(prompt["input_ids"][0, -2:].tolist()) == ["<|im_start|>", "assistant"]
    batch = collate([encoded, prompt], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(ids)) and batch["attention_mask"][1].sum() == len(ids) - 2


def test_segments_reproduce_the_rendered_conversation():
    tokenizer = tiny.build_tokenizer()
    messages = [{"role": "user", "content": "<video>\nq ?"}, {"role": "assistant", "content": "red"}]
    segments = conversation_segments(tokenizer, messages, True)
    assert "".join(text for text, _ in segments) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert [text for text, answer in segments if answer] == ["red<|im_end|>\n"]


def test_load_records_errors(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_records(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('[{"id": 1, "video": "x.mp4", "conversations": [}')
    with pytest.raises(UserInputError, match="not valid JSON"):
        load_records(tmp_path / "bad.json")
    (tmp_path / "turns.json").write_text(json.dumps([{"id": 1, "conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(UserInputError, match="'from'"):
        load_records(tmp_path / "turns.json")
