"""Saved checkpoints put exactly one BOS in front of a prompt, whichever way it is tokenised.

lmms-eval's llava_hf renders the chat template to text and calls the processor with its default
add_special_tokens=True; llava.eval (encode_record) tokenises without special tokens and adds
the BOS itself. A template that writes BOS while the tokenizer also adds one gave lmms-eval two
(0.883 instead of 0.900 on the embedded model), so the saved template leaves BOS to the tokenizer.
"""

import pytest
import torch
from transformers import AutoProcessor

from llava import data
from llava.embedded import paths, tiny


def _bos_count(ids, bos_id) -> int:
    return int((torch.as_tensor(ids) == bos_id).sum())


def _lmms_eval_style_ids(processor, record, image_folder):
    """What lmms-eval 0.7.3's llava_hf feeds: string content with '<image>\\n' in front, the
    tokenizer's template, then processor(text=..., images=...) with its default special tokens."""
    question = record["conversations"][0]["value"].replace(data.IMAGE_PLACEHOLDER, "").strip()
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{data.IMAGE_PLACEHOLDER}\n{question}"}], tokenize=False,
        add_generation_prompt=True)
    image = data.load_image(image_folder, record["image"])
    return processor(text=text, images=image, return_tensors="pt")["input_ids"][0]


@pytest.fixture(scope="module")
def record():
    return data.load_records(paths.EVAL_DATA_PATH)[0]


def _check_one_bos(processor, record, image_folder):
    bos = processor.tokenizer.bos_token_id
    theirs = _lmms_eval_style_ids(processor, record, image_folder)
    prompt = data.encode_record(processor, record, image_folder, with_answer=False, add_generation_prompt=True)
    ours = prompt["input_ids"][0]
    assert theirs[0] == bos and _bos_count(theirs, bos) == 1
    assert ours[0] == bos and _bos_count(ours, bos) == 1
    assert torch.equal(theirs, ours)  # the same prompt tokens, image tokens included
    # transformers' own processor.apply_chat_template(tokenize=True) agrees
    messages = data.build_messages(record, with_answer=False)
    messages[0]["content"] = [{"type": "image", "image": data.load_image(image_folder, record["image"])}
                              if item["type"] == "image" else item for item in messages[0]["content"]]
    hf = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                       return_tensors="pt")["input_ids"][0]
    assert torch.equal(hf, ours)


def test_committed_embedded_checkpoint_has_one_bos(record):
    processor = AutoProcessor.from_pretrained(paths.CHECKPOINT_DIR)
    assert not processor.chat_template.startswith("{{- '" + tiny.BOS)
    _check_one_bos(processor, record, paths.EVAL_IMAGE_FOLDER)


def test_trainer_processor_saves_one_bos(record, tmp_path):
    """What scripts/embedded/train_llava_next.sh writes (tiny.build_processor, save, reload)."""
    tiny.build_processor().save_pretrained(tmp_path)
    _check_one_bos(AutoProcessor.from_pretrained(tmp_path), record, paths.EVAL_IMAGE_FOLDER)


def test_leave_bos_to_tokenizer_fixes_a_bos_writing_template(record, tmp_path):
    """The pruners' save step: a template that writes BOS is changed, encode_record's ids are not."""
    processor = AutoProcessor.from_pretrained(paths.CHECKPOINT_DIR)
    before = data.encode_record(processor, record, paths.EVAL_IMAGE_FOLDER)
    processor.chat_template = "{{- '" + tiny.BOS + "' -}}" + processor.chat_template
    processor.tokenizer.chat_template = processor.chat_template
    assert _bos_count(_lmms_eval_style_ids(processor, record, paths.EVAL_IMAGE_FOLDER),
                      processor.tokenizer.bos_token_id) == 2
    assert data.leave_bos_to_tokenizer(processor)
    assert not data.leave_bos_to_tokenizer(processor)  # nothing left to remove
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    _check_one_bos(reloaded, record, paths.EVAL_IMAGE_FOLDER)
    after = data.encode_record(reloaded, record, paths.EVAL_IMAGE_FOLDER)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_leave_bos_to_tokenizer_leaves_unknown_forms_alone():
    processor = AutoProcessor.from_pretrained(paths.CHECKPOINT_DIR)
    # BOS written by an expression: not a recognised literal, so the template is kept as it is
    odd = "{{- bos_token + '' -}}" + processor.chat_template
    processor.chat_template = odd
    assert not data.leave_bos_to_tokenizer(processor)
    assert processor.chat_template == odd

