"""AVInstruct-style data for VideoLLaMA2-AV: loading, calibration draw, prompts and encoding.

A data file is a JSON list of records as written by datasets/transform_to_avinstruct.py:

    {"id": 0, "video": "<file>.mp4", "audio": "<file>.mp4" or "<file>.wav",
     "conversations": [{"from": "human", "value": "<video>\\n<question>"}, {"from": "gpt", "value": "<answer>"}]}

Media paths are relative to `data_folder`. An audio path with a video suffix means the video's
own audio track. A record with only "audio" is audio-only (`<audio>` placeholder); with only
"video", video-only. As in the reference preprocessing, the placeholder is moved to the front of
the first human turn (and added there if the text lacks it).

Prompts use the checkpoint tokenizer's chat template (Qwen2: default system message, then
`<|im_start|>user\\n<video>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`); calibration
appends each answer and its end-of-turn text, which are the only labelled tokens. The
placeholder becomes one negative id (-201 / -202) that the model replaces by the media tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from mmprune.run.checks import check_draw
from mmprune.base.errors import UserInputError
from videollama2.media import MediaLoader
from videollama2.model import AUDIO_TOKEN_INDEX, IGNORE_INDEX, PLACEHOLDERS, VIDEO_TOKEN_INDEX

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PLACEHOLDER_PATTERN = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS) + ")")


# --------------------------------------------------------------------------------------------- files


def load_records(data_path) -> list:
    """The validated list of records of an AVInstruct-format JSON file."""
    path = Path(data_path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise UserInputError(f"data file {path} {state}; pass an AVInstruct JSON made by "
                             "datasets/transform_to_avinstruct.py")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserInputError(f"data file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                             f"{exc.colno}; fix or regenerate the file") from None
    except UnicodeDecodeError as exc:
        raise UserInputError(f"data file {path} is not UTF-8 text ({exc.reason}); is it the right file?") from None
    if not isinstance(records, list) or not records:
        raise UserInputError(f"data file {path} must hold a non-empty JSON list of records")
    for index, record in enumerate(records):
        check_record(record, index, path)
    return records


def check_record(record, index: int, path) -> None:
    where = f"{path}: record {index}"
    if not isinstance(record, dict):
        raise UserInputError(f"{where} is a {type(record).__name__}, expected an object with 'conversations'")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserInputError(f"{where} (id {record.get('id')!r}) has no 'conversations' list")
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise UserInputError(f"{where} (id {record.get('id')!r}) has a turn {turn!r}; each turn needs 'from' "
                                 f"({'/'.join(ROLES)}) and a string 'value'")
    for key in ("video", "audio"):
        if key in record and not (isinstance(record[key], str) and record[key]):
            raise UserInputError(f"{where} (id {record.get('id')!r}): '{key}' must be a file name")


def select_samples(records: list, nsamples: int, seed: int) -> list:
    """nsamples records drawn without replacement, in drawn order: the public code's
    `np.random.seed(seed); np.random.choice(len(records), nsamples, replace=False)`."""
    check_draw(nsamples, len(records), "the data file")
    picks = np.random.RandomState(seed).choice(np.arange(len(records)), size=nsamples, replace=False)
    return [records[int(i)] for i in picks]


def media_paths(record: dict, data_folder) -> tuple[Path | None, Path | None]:
    folder = Path(data_folder)
    video = folder / record["video"] if record.get("video") else None
    audio = folder / record["audio"] if record.get("audio") else None
    return video, audio


def check_media(records: list, data_folder, media: MediaLoader) -> None:
    """Decode every record's media now, so a missing or broken file stops a run before the model
    is loaded (results stay cached in `media`)."""
    for record in records:
        video, audio = media_paths(record, data_folder)
        if video is not None:
            media.video(video)
        if audio is not None:
            media.audio(audio)


# --------------------------------------------------------------------------------------------- prompts


def normalized_turns(record: dict) -> list[dict]:
    """Chat messages with the record's placeholder at the front of the first human turn."""
    tag = "<video>" if record.get("video") else "<audio>" if record.get("audio") else None
    messages, placed = [], False
    for turn in record["conversations"]:
        role, text = ROLES[turn["from"]], turn["value"]
        if tag is not None:
            text = _PLACEHOLDER_PATTERN.sub("", text).strip()
            if role == "user" and not placed:
                text, placed = f"{tag}\n{text}", True
        elif _PLACEHOLDER_PATTERN.search(text):
            raise UserInputError(f"record {record.get('id')!r} has a media placeholder but no 'video' or 'audio'")
        messages.append({"role": role, "content": text})
    if tag is not None and not placed:
        raise UserInputError(f"record {record.get('id')!r} has media but no human turn to attach them to")
    return messages


def has_answer(record: dict) -> bool:
    """Whether the record has an assistant turn, i.e. labelled answer tokens once encoded."""
    return any(ROLES.get(turn.get("from")) == "assistant" for turn in record["conversations"])


def reference_answer(record: dict) -> str | None:
    last = record["conversations"][-1]
    return last["value"] if ROLES[last["from"]] == "assistant" else None


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja errors, missing template
        raise UserInputError(f"the tokenizer's chat template cannot render the conversation ({exc})") from None


def conversation_segments(tokenizer, messages, with_answer: bool) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces whose concatenation is the rendered conversation. Without answer,
    the last assistant turn is dropped and the generation prompt ends the text."""
    if not with_answer:
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return [(_render(tokenizer, messages, True), False)]
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True)
        full = _render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserInputError("the chat template does not render conversations incrementally; cannot find the "
                                 "answer tokens")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = _render(tokenizer, messages, False)[len(done):]
    if rest:
        segments.append((rest, False))
    return segments


def tokenize_segments(tokenizer, segments) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, is_answer in segments:
        for piece in _PLACEHOLDER_PATTERN.split(text):
            if not piece:
                continue
            if piece in PLACEHOLDERS:
                chunk = [PLACEHOLDERS[piece]]
            else:
                chunk = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids += chunk
            labels += chunk if is_answer and piece not in PLACEHOLDERS else [IGNORE_INDEX] * len(chunk)
    return ids, labels


def encode_record(tokenizer, record: dict, data_folder, media: MediaLoader, with_answer: bool = True) -> dict:
    """Model inputs of one record: input_ids/labels (1, L) with one placeholder id, video
    (1, T, 3, S, S) and/or audio (1, n, 128) when the record has them."""
    segments = conversation_segments(tokenizer, normalized_turns(record), with_answer)
    ids, labels = tokenize_segments(tokenizer, segments)
    encoded = {"input_ids": torch.tensor([ids], dtype=torch.long),
               "labels": torch.tensor([labels], dtype=torch.long)}
    video, audio = media_paths(record, data_folder)
    if video is not None:
        encoded["video"] = media.video(video).unsqueeze(0)
    if audio is not None:
        encoded["audio"] = media.audio(audio).unsqueeze(0)
    return encoded


def model_inputs(encoded: dict) -> dict:
    return {k: encoded[k] for k in ("input_ids", "attention_mask", "video", "audio", "labels") if k in encoded}


def collate(encoded: list[dict], pad_id: int) -> dict:
    """Right-padded batch; every sample must have the same media kinds."""
    kinds = {tuple(k for k in ("video", "audio") if k in e) for e in encoded}
    if len(kinds) != 1:
        raise ValueError("a batch must not mix media kinds")
    length = max(e["input_ids"].shape[1] for e in encoded)
    batch = {"input_ids": torch.full((len(encoded), length), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(encoded), length), dtype=torch.long),
             "labels": torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)}
    for i, e in enumerate(encoded):
        n = e["input_ids"].shape[1]
        batch["input_ids"][i, :n] = e["input_ids"][0]
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, :n] = e["labels"][0]
    for key in kinds.pop():
        batch[key] = torch.cat([e[key] for e in encoded])
    return batch


__all__ = ["load_records", "select_samples", "encode_record", "collate", "check_media", "media_paths",
           "reference_answer", "VIDEO_TOKEN_INDEX", "AUDIO_TOKEN_INDEX"]
