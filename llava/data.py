"""LLaVA-NeXT raw-format data: loading, task selection, chat rendering and encoding.

Used by calibration (pruning) and by evaluation, for the real LLaVA-NeXT-Data and for the
embedded synthetic default alike. A raw-format file is a JSON list of records

    {"id": ..., "image": "<task>/<file>", "conversations": [
        {"from": "human", "value": "<image>\\n<question>"}, {"from": "gpt", "value": "<answer>"}]}

Records read from the LLaVA-NeXT-Data parquet shards (llava/parquet_data.py) carry their image
bytes under IMAGE_BYTES; `open_record_image` reads either kind.

`encode_record` renders a record with the processor's chat template and returns model inputs plus
`labels` (answer tokens only) and `modality_ids` (TEXT or IMAGE per token position).

Image placement: the `<image>` placeholder in a human turn becomes an image item at that place.
A record with an `image` but no placeholder gets the image first in its first human turn (LLaVA's
convention); a placeholder without an `image` field, more than one placeholder, or a list of
images is an error (one image per record, as in LLaVA-NeXT's fine-tuning data).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmprune.run.checks import image_to_rgb, require_file
from mmprune.base.errors import UserInputError

# Per-token modality ids (int8), shared with the pruning core.
TEXT = 0
IMAGE = 1

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}
# A parquet record's image bytes (llava/parquet_data.py); its "image" is then only a name.
IMAGE_BYTES = "image_bytes"
# Keys of an encoded record that the model's forward accepts (the rest are ours).
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


# --------------------------------------------------------------------------------------------
# Files


def _read_json(path, what: str, hint: str):
    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise UserInputError(f"{what} {path} {state}; {hint}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UserInputError(
            f"{what} {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; "
            "fix or regenerate the file") from None
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{what} {path} is not UTF-8 text ({exc.reason}); is it the right file?") from None


def _check_record(record, index: int) -> None:
    if not isinstance(record, dict):
        raise UserInputError(f"record {index} is a {type(record).__name__}, expected an object "
                             "with 'conversations'")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserInputError(f"record {index} (id {record.get('id')!r}) has no 'conversations' list; "
                             "each record needs [{'from': 'human', 'value': ...}, ...]")
    for turn in turns:
        if not isinstance(turn, dict) or "from" not in turn or not isinstance(turn.get("value"), str):
            raise UserInputError(f"record {index} (id {record.get('id')!r}) has a turn {turn!r}; "
                                 "each turn needs 'from' and a string 'value'")


def load_records(data_path) -> list:
    """The list of records in a LLaVA-NeXT raw-format JSON file, validated."""
    records = _read_json(data_path, "data file",
                         "pass an existing LLaVA-NeXT raw-format JSON (a list of records)")
    if not isinstance(records, list):
        raise UserInputError(f"data file {data_path} holds a JSON {type(records).__name__}, "
                             "expected a list of records")
    for index, record in enumerate(records):
        _check_record(record, index)
    return records


def load_task_split(task_split_path) -> dict:
    """{task: [start, end)} as written by llava/pruners/split_finetune_llava_next.py."""
    split = _read_json(task_split_path, "task split",
                       "create it with python -m llava.pruners.split_finetune_llava_next")
    if not isinstance(split, dict) or not all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r)
            for r in split.values()):
        raise UserInputError(f"task split {task_split_path} must map task names to [start, end] "
                             "index pairs; regenerate it with split_finetune_llava_next")
    return split


def image_task(record: dict) -> str | None:
    """The task a record belongs to: the first folder of its image path (split_finetune_llava_next)."""
    image = record.get("image")
    if not isinstance(image, str) or "/" not in image:
        return None
    return image.split("/")[0] or None


def check_task_range(records: list, start: int, end: int, task_name: str, task_split_path) -> None:
    """No record in a task's range may belong to another task (by image folder): a split made for
    another version of the data file would otherwise calibrate on the wrong records. Records
    without an image belong to no task and pass."""
    foreign = [i for i in range(start, end) if image_task(records[i]) not in (None, task_name)]
    if foreign:
        first = records[foreign[0]]
        raise UserInputError(
            f"task split {task_split_path}: {len(foreign)} of the {end - start} records in the range [{start}, {end}) "
            f"of task {task_name!r} are not in its image folder (record {foreign[0]} has image "
            f"{first.get('image')!r}); the split was made for another data file: regenerate it with "
            "python -m llava.pruners.split_finetune_llava_next")


def select_task(records: list, task_split_path, task_name: str, nsamples: int | None,
                seed: int) -> list:
    """nsamples records of one task, drawn without replacement, **in drawn order**.

    The draw is `numpy.random.default_rng(seed).choice(task_size, nsamples, replace=False)`
    over the task's half-open range; nsamples=None returns the whole task in file order.
    """
    split = load_task_split(task_split_path)
    if task_name not in split:
        raise UserInputError(f"unknown task {task_name!r} in {task_split_path}; available tasks: "
                             f"{', '.join(sorted(split)) or '(none)'}")
    start, end = split[task_name]
    if not 0 <= start < end <= len(records):
        raise UserInputError(
            f"task {task_name!r} range [{start}, {end}) does not fit the {len(records)} records "
            "of the data file; the split belongs to another file: regenerate it with "
            "split_finetune_llava_next")
    check_task_range(records, start, end, task_name, task_split_path)
    if nsamples is None:
        return records[start:end]
    if nsamples < 1 or nsamples > end - start:
        raise UserInputError(f"cannot draw {nsamples} samples from task {task_name!r}, which has "
                             f"{end - start} records; use --nsamples between 1 and {end - start}")
    picks = np.random.default_rng(seed).choice(end - start, size=nsamples, replace=False)
    return [records[start + int(i)] for i in picks]


def load_image(image_folder, relpath) -> Image.Image:
    """The image as RGB, fully decoded now so that a corrupt file fails here, naming its path."""
    path = require_file(Path(image_folder) / relpath, "image", "check --image_folder and the record's 'image' "
                        "(images are looked up as image_folder/<record image>)")
    return decode_image(path, path)


def decode_image(source, name) -> Image.Image:
    """An image file or file-like object (e.g. the bytes of a parquet shard) as RGB, decoded now;
    `name` says which image in an error."""
    try:
        with Image.open(source) as image:
            image.load()
            return image_to_rgb(image, name)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL's errors for unreadable data
        raise UserInputError(f"image {name} cannot be read ({exc}); replace or remove it") from None


def open_record_image(record: dict, image_folder) -> Image.Image:
    """A record's image: the bytes a parquet record carries, else image_folder/<record image>."""
    data = record.get(IMAGE_BYTES)
    if data is not None:
        return decode_image(io.BytesIO(data), f"{record_image(record)} of record {record.get('id')!r}")
    return load_image(image_folder, record_image(record))


# --------------------------------------------------------------------------------------------
# Conversations


def record_image(record: dict) -> str | None:
    """The record's image path, or None for a text-only record."""
    image = record.get("image")
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise UserInputError(f"record {record.get('id')!r} has image {image!r}; only one image path "
                             "(a string) per record is supported")
    return image


def _user_content(text: str, with_image: bool) -> list:
    """Typed content items; the placeholder, if any, becomes the image item at its place."""
    if not with_image:
        return [{"type": "text", "text": text.strip()}]
    before, sep, after = text.partition(IMAGE_PLACEHOLDER)
    if not sep:  # image without placeholder: image first, as LLaVA does
        before, after = "", text
    items = [{"type": "text", "text": before.strip()}] if before.strip() else []
    items.append({"type": "image"})
    if after.strip():
        items.append({"type": "text", "text": after.strip()})
    return items


def build_messages(record: dict, with_answer: bool = True) -> list:
    """The record's turns as transformers chat messages.

    with_answer=False drops the final assistant turn (the reference answer), leaving a prompt.
    """
    turns = record.get("conversations") or []
    has_image = record_image(record) is not None
    placeholders = sum(t.get("value", "").count(IMAGE_PLACEHOLDER) for t in turns)
    if placeholders > 1:
        raise UserInputError(f"record {record.get('id')!r} has {placeholders} '<image>' placeholders; "
                             "only one image per record is supported")
    if placeholders and not has_image:
        raise UserInputError(f"record {record.get('id')!r} has '<image>' in its conversation but no "
                             "'image' field; add the image path or remove the placeholder")
    image_turn = None  # index of the user turn that gets the image
    if has_image:
        image_turn = next((i for i, t in enumerate(turns) if IMAGE_PLACEHOLDER in t["value"]), None)
        if image_turn is None:
            image_turn = next((i for i, t in enumerate(turns) if ROLES.get(t["from"]) == "user"), None)
        if image_turn is None:
            raise UserInputError(f"record {record.get('id')!r} has an image but no human turn to put it in")
    messages = []
    for i, turn in enumerate(turns):
        role = ROLES.get(turn["from"])
        if role is None:
            raise UserInputError(f"record {record.get('id')!r} has a turn from {turn['from']!r}; "
                                 f"expected one of {sorted(ROLES)}")
        if role == "user":
            content = _user_content(turn["value"], i == image_turn)
        else:
            content = [{"type": "text", "text": turn["value"].strip()}]
        messages.append({"role": role, "content": content})
    if not with_answer and messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages


def has_answer(record: dict) -> bool:
    """Whether the record has an assistant turn, i.e. labelled answer tokens once encoded."""
    return any(ROLES.get(turn.get("from")) == "assistant" for turn in record.get("conversations") or [])


def reference_answer(record: dict) -> str | None:
    """The text of the record's final assistant turn (what evaluation compares against)."""
    turns = record.get("conversations") or []
    if turns and ROLES.get(turns[-1].get("from")) == "assistant":
        return turns[-1]["value"]
    return None


# --------------------------------------------------------------------------------------------
# Encoding


def image_token_id(processor) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int(token_id)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether encoding with special tokens puts BOS in front (Llama-3's tokenizer does)."""
    if not tokenizer.bos_token:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tokenizer.bos_token_id


def _bos_prefix(tokenizer, text: str) -> str:
    """Text with the BOS the tokenizer would add, unless the template already wrote it.

    We always tokenise with add_special_tokens=False (some tokenizers also append EOS), so the
    BOS the template lacks is prepended as text: it is never doubled and never missing.
    """
    bos = tokenizer.bos_token
    if not bos or text.startswith(bos):
        return text
    return bos + text if tokenizer_adds_bos(tokenizer) else text


# How Llama-3 style templates write BOS; only these literal forms are removed, and only when the
# rendering then differs from before by exactly that BOS.
_TEMPLATE_BOS_FORMS = ("{{- '%s' -}}", "{{ '%s' }}", "{{- bos_token -}}", "{{ bos_token }}", "%s")
_BOS_PROBE = [{"role": "user", "content": [{"type": "text", "text": "a"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "b"}]}]


def leave_bos_to_tokenizer(processor) -> bool:
    """Remove the BOS a chat template writes when the tokenizer adds one too; True if changed.

    Tools that render the template to text and then call the processor with its default
    add_special_tokens=True (lmms-eval's llava_hf, most example code) would otherwise feed two BOS
    tokens. encode_record is unaffected: it prepends the tokenizer's BOS as text when the template
    lacks it, so its token ids are the same before and after. A template that writes BOS in a
    form not recognised here is left alone (the caller may warn).
    """
    tokenizer = processor.tokenizer
    template = processor.chat_template
    bos = tokenizer.bos_token
    if not isinstance(template, str) or not tokenizer_adds_bos(tokenizer):
        return False
    renders = [processor.apply_chat_template(_BOS_PROBE[:n], tokenize=False, add_generation_prompt=g)
               for n, g in ((1, True), (2, False))]
    if not all(r.startswith(bos) for r in renders):
        return False
    for form in _TEMPLATE_BOS_FORMS:
        literal = form % bos if "%s" in form else form
        if literal not in template:
            continue
        candidate = template.replace(literal, "", 1)
        trial = [processor.apply_chat_template(_BOS_PROBE[:n], tokenize=False, add_generation_prompt=g,
                                               chat_template=candidate)
                 for n, g in ((1, True), (2, False))]
        if trial == [r[len(bos):] for r in renders]:
            processor.chat_template = candidate
            tokenizer.chat_template = candidate  # the tokenizer keeps its own copy in memory
            return True
    return False


def _render(processor, messages: list, add_generation_prompt: bool) -> str:
    text = processor.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return _bos_prefix(processor.tokenizer, text)


def _token_ids(tokenizer, text: str) -> list:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _answer_spans(processor, messages: list, full_ids: list) -> list:
    """[start, end) of every assistant turn in the unexpanded token ids of the conversation.

    Each span is found by rendering the conversation up to the turn (with generation prompt) and
    through the turn; this needs a template whose renderings are prefixes of one another, which
    is checked rather than assumed.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _token_ids(processor.tokenizer, _render(processor, messages[:i], True))
        through = _token_ids(processor.tokenizer, _render(processor, messages[:i + 1], False))
        if through[:len(prompt)] != prompt or full_ids[:len(through)] != through:
            raise UserInputError(
                "the chat template does not render a conversation as a prefix of its continuation, "
                "so answer tokens cannot be located; use a Llama-3 style chat template")
        spans.append((len(prompt), len(through)))
    return spans


def _expand_positions(spans: list, unexpanded: list, image_id: int, n_image_tokens: int) -> list:
    """Map spans from unexpanded ids (one <image> id) to the processor's expanded ids."""
    if image_id not in unexpanded:
        return spans
    where = unexpanded.index(image_id)
    shift = n_image_tokens - 1

    def move(p):
        return p + shift if p > where else p

    return [(move(s), move(e)) for s, e in spans]


def encode_conversation(processor, record: dict, image: Image.Image | None, with_answer: bool = True,
                        add_generation_prompt: bool = False) -> dict:
    """encode_record with the image already loaded (None for a text-only record)."""
    messages = build_messages(record, with_answer)
    if (image is None) != (record_image(record) is None):
        raise UserInputError(f"record {record.get('id')!r}: an image must be given exactly when the "
                             "record names one")
    text = _render(processor, messages, add_generation_prompt)
    kwargs = {"images": image} if image is not None else {}
    inputs = processor(text=text, return_tensors="pt", add_special_tokens=False, **kwargs)
    input_ids = inputs["input_ids"]
    tokenizer = processor.tokenizer
    if input_ids.shape[1] > 1 and tokenizer.bos_token_id is not None and \
            (input_ids[0, :2] == tokenizer.bos_token_id).all():
        raise UserInputError("the prompt starts with two BOS tokens; the chat template and the "
                             "tokenizer both add one")

    image_id = image_token_id(processor)
    is_image = input_ids == image_id
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if with_answer:
        unexpanded = _token_ids(tokenizer, text)
        spans = _answer_spans(processor, messages, unexpanded)
        for start, end in _expand_positions(spans, unexpanded, image_id, int(is_image.sum())):
            labels[0, start:end] = input_ids[0, start:end]
    encoded = {key: inputs[key] for key in MODEL_INPUT_KEYS if key in inputs}
    encoded["labels"] = labels
    encoded["modality_ids"] = torch.where(is_image, IMAGE, TEXT).to(torch.int8)
    return encoded


def encode_record(processor, record: dict, image_folder, with_answer: bool = True,
                  add_generation_prompt: bool = False) -> dict:
    """Model inputs for one record, batch size 1.

    Returns `input_ids`, `attention_mask` (1, L); `pixel_values` (1, tiles, 3, H, W) and
    `image_sizes` (1, 2) when the record has an image; `labels` (1, L), IGNORE_INDEX except on the
    assistant answer tokens (with their end-of-turn token) when with_answer; and `modality_ids`
    (1, L) int8, IMAGE where input_ids is the processor's image token (base, grid and newline
    positions, since the processor expands `<image>`), TEXT elsewhere.
    """
    image = open_record_image(record, image_folder) if record_image(record) is not None else None
    return encode_conversation(processor, record, image, with_answer, add_generation_prompt)


def model_inputs(encoded: dict) -> dict:
    """The subset of an encoded record that the model's forward takes."""
    return {key: encoded[key] for key in MODEL_INPUT_KEYS if key in encoded}


def collate(encoded: list, pad_token_id: int) -> dict:
    """Right-pad a list of encoded records into one batch (labels and modality ids padded too).

    All records must agree on having an image or not; tiles are zero-padded to the most tiles.
    """
    length = max(e["input_ids"].shape[1] for e in encoded)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "modality_ids": TEXT}
    batch = {}
    for key, value in fill.items():
        rows = [torch.nn.functional.pad(e[key], (0, length - e[key].shape[1]), value=value) for e in encoded]
        batch[key] = torch.cat(rows)
    with_pixels = ["pixel_values" in e for e in encoded]
    if any(with_pixels):
        if not all(with_pixels):
            raise ValueError("cannot batch records with and without images together")
        tiles = max(e["pixel_values"].shape[1] for e in encoded)
        batch["pixel_values"] = torch.cat([
            torch.nn.functional.pad(e["pixel_values"], (0, 0, 0, 0, 0, 0, 0, tiles - e["pixel_values"].shape[1]))
            for e in encoded])
        batch["image_sizes"] = torch.cat([e["image_sizes"] for e in encoded])
    return batch
