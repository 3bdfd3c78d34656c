"""llava/data.py on a random-weight tiny LLaVA-NeXT and a few synthetic records."""

import json

import pytest
import torch

from llava import data
from llava.embedded import synthetic_vqa as vqa, tiny
from mmprune.base.errors import UserInputError


@pytest.fixture(scope="module")
def model_and_processor():
    torch.manual_seed(0)
    model, processor = tiny.build(seed=0)
    return model.eval(), processor


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 records in two tasks (8 + 4) with their PNGs, plus task_split.json."""
    root = tmp_path_factory.mktemp("llava_data")
    records = vqa.write_task("pool", 8, 0, root) + vqa.write_task("other", 4, 0, root)
    data_path = root / "data.json"
    data_path.write_text(json.dumps(records))
    split_path = root / "task_split.json"
    split_path.write_text(json.dumps({"pool": [0, 8], "other": [8, 12]}))
    return {"root": root, "data_path": data_path, "split": split_path, "records": records}


def _text_only():
    return {"id": "txt", "conversations": [{"from": "human", "value": "how many shapes are there?"},
                                           {"from": "gpt", "value": "two"}]}


# ---------------------------------------------------------------------------- loading


def test_load_records(dataset):
    assert data.load_records(dataset["data_path"]) == dataset["records"]


def test_missing_data_file(tmp_path):
    with pytest.raises(UserInputError, match="nope.json does not exist"):
        data.load_records(tmp_path / "nope.json")


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n {"id": 1,\n  "conversations": [}\n]')
    with pytest.raises(UserInputError, match=r"not valid JSON: .* line 3 column \d+"):
        data.load_records(path)


@pytest.mark.parametrize("content, match", [
    ({"id": 1}, "holds a JSON dict, expected a list"),
    ([{"id": 1, "image": "a/b.png"}], "record 0 .* no 'conversations'"),
    (["text"], "record 0 is a str"),
    ([{"conversations": [{"value": "x"}]}], "each turn needs 'from'"),
])
def test_wrong_structure(tmp_path, content, match):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserInputError, match=match):
        data.load_records(path)


# ---------------------------------------------------------------------------- task selection


def test_select_task_draws_within_range(dataset):
    picked = data.select_task(dataset["records"], dataset["split"], "pool", 5, seed=3)
    assert len(picked) == 5 and len({r["id"] for r in picked}) == 5
    assert all(r["image"].startswith("pool/") for r in picked)
    again = data.select_task(dataset["records"], dataset["split"], "pool", 5, seed=3)
    assert [r["id"] for r in again] == [r["id"] for r in picked]  # same seed, same order
    other = data.select_task(dataset["records"], dataset["split"], "pool", 5, seed=4)
    assert [r["id"] for r in other] != [r["id"] for r in picked]


def test_select_task_whole_task(dataset):
    picked = data.select_task(dataset["records"], dataset["split"], "other", None, seed=0)
    assert picked == dataset["records"][8:12]


def test_unknown_task_lists_available(dataset):
    with pytest.raises(UserInputError, match="unknown task 'nope'.*available tasks: other, pool"):
        data.select_task(dataset["records"], dataset["split"], "nope", 1, seed=0)


def test_too_many_samples(dataset):
    with pytest.raises(UserInputError, match="cannot draw 5 samples from task 'other', which has 4"):
        data.select_task(dataset["records"], dataset["split"], "other", 5, seed=0)


def test_split_not_matching_data(dataset):
    with pytest.raises(UserInputError, match="does not fit the 3 records"):
        data.select_task(dataset["records"][:3], dataset["split"], "other", 1, seed=0)


# ---------------------------------------------------------------------------- images


def test_load_image_rgb(dataset):
    image = data.load_image(dataset["root"], dataset["records"][0]["image"])
    assert image.mode == "RGB" and image.size in {(w, h) for h, w in vqa.IMAGE_SIZES}


def test_missing_image_names_path(tmp_path):
    with pytest.raises(UserInputError, match=r"image .*pool[/\\]gone.png does not exist"):
        data.load_image(tmp_path, "pool/gone.png")


@pytest.mark.parametrize("payload", [b"not a png at all", "truncated"])
def test_corrupt_image_names_path(dataset, tmp_path, payload):
    if payload == "truncated":
        payload = (dataset["root"] / dataset["records"][0]["image"]).read_bytes()[:60]
    (tmp_path / "bad.png").write_bytes(payload)
    with pytest.raises(UserInputError, match=r"image .*bad.png cannot be read"):
        data.load_image(tmp_path, "bad.png")


# ---------------------------------------------------------------------------- messages


def test_build_messages_placeholder_becomes_image_item(dataset):
    record = dataset["records"][0]
    messages = data.build_messages(record)
    assert messages[0] == {"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": record["conversations"][0]["value"][len("<image>\n"):]}]}
    assert messages[1] == {"role": "assistant", "content": [
        {"type": "text", "text": record["conversations"][1]["value"]}]}
    assert data.build_messages(record, with_answer=False) == messages[:1]


def test_build_messages_placeholder_at_end_keeps_order():
    record = {"image": "a/b.png", "conversations": [{"from": "human", "value": "look\n<image>"}]}
    content = data.build_messages(record)[0]["content"]
    assert content == [{"type": "text", "text": "look"}, {"type": "image"}]


def test_image_without_placeholder_goes_first():
    record = {"image": "a/b.png", "conversations": [{"from": "human", "value": "what color?"},
                                                    {"from": "gpt", "value": "red"}]}
    assert data.build_messages(record)[0]["content"] == [{"type": "image"},
                                                         {"type": "text", "text": "what color?"}]


@pytest.mark.parametrize("record, match", [
    ({"id": "x", "conversations": [{"from": "human", "value": "<image>\nq"}]}, "no 'image' field"),
    ({"id": "x", "image": "a/b.png",
      "conversations": [{"from": "human", "value": "<image> <image>"}]}, "2 '<image>' placeholders"),
    ({"id": "x", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "q"}]},
     "only one image path"),
    ({"id": "x", "conversations": [{"from": "robot", "value": "q"}]}, "turn from 'robot'"),
])
def test_build_messages_errors(record, match):
    with pytest.raises(UserInputError, match=match):
        data.build_messages(record)


# ---------------------------------------------------------------------------- encoding


def test_labels_only_on_answer_tokens(model_and_processor, dataset):
    _, processor = model_and_processor
    tokenizer = processor.tokenizer
    for record in dataset["records"][:4]:
        encoded = data.encode_record(processor, record, dataset["root"])
        labels = encoded["labels"][0]
        answer_positions = (labels != data.IGNORE_INDEX).nonzero().flatten()
        # one contiguous run at the very end: the answer word and <|eot_id|>
        assert answer_positions.tolist() == list(range(labels.numel() - 2, labels.numel()))
        tokens = tokenizer.convert_ids_to_tokens(labels[answer_positions].tolist())
        assert tokens == [record["conversations"][1]["value"], tiny.EOT]
        assert torch.equal(labels[answer_positions], encoded["input_ids"][0, answer_positions])


def test_bos_once(model_and_processor, dataset):
    _, processor = model_and_processor
    ids = data.encode_record(processor, dataset["records"][0], dataset["root"])["input_ids"][0]
    bos = processor.tokenizer.bos_token_id
    assert ids[0] == bos and (ids == bos).sum() == 1


def test_template_with_bos_is_not_doubled(model_and_processor, dataset):
    """A template that writes BOS itself (the embedded one did) encodes exactly like one that leaves
    it to the tokenizer (llava-hf's, the embedded one now)."""
    _, processor = model_and_processor
    record = dataset["records"][0]
    assert not processor.apply_chat_template(data.build_messages(record), tokenize=False).startswith(tiny.BOS)
    with_bos = tiny.build_processor(processor.tokenizer)
    with_bos.chat_template = "{{- '" + tiny.BOS + "' -}}" + tiny.CHAT_TEMPLATE
    assert with_bos.apply_chat_template(data.build_messages(record), tokenize=False).startswith(tiny.BOS)
    a = data.encode_record(with_bos, record, dataset["root"])
    b = data.encode_record(processor, record, dataset["root"])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_prompt_encoding_for_generation(model_and_processor, dataset):
    _, processor = model_and_processor
    encoded = data.encode_record(processor, dataset["records"][0], dataset["root"], with_answer=False,
                                 add_generation_prompt=True)
    tokens = processor.tokenizer.convert_ids_to_tokens(encoded["input_ids"][0, -3:].tolist())
    assert tokens == [tiny.START_HEADER, "assistant", tiny.END_HEADER]
    assert (encoded["labels"] == data.IGNORE_INDEX).all()


@pytest.mark.parametrize("size", vqa.IMAGE_SIZES)
def test_modality_ids_match_model_image_features(model_and_processor, tmp_path, size):
    """Image positions = the number of features the model packs, for every image size."""
    model, processor = model_and_processor
    image = vqa.render(vqa.Scene(size[0], size[1], (240, 240, 240), ()))
    record = {"id": "s", "image": "t/s.png",
              "conversations": [{"from": "human", "value": "<image>\nhow many shapes are there?"},
                                {"from": "gpt", "value": "one"}]}
    (tmp_path / "t").mkdir()
    image.save(tmp_path / "t" / "s.png")
    encoded = data.encode_record(processor, record, tmp_path)
    modality = encoded["modality_ids"]
    assert modality.dtype == torch.int8 and modality.shape == encoded["input_ids"].shape
    n_image = int((modality == data.IMAGE).sum())
    assert n_image == int((encoded["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        features = model.model.get_image_features(encoded["pixel_values"], encoded["image_sizes"])
    packed = features.pooler_output if hasattr(features, "pooler_output") else features
    assert n_image == sum(f.shape[0] for f in packed)
    # 16 base + unpadded grid + one newline per grid row (models.md 1.5 formula)
    rows, cols = size[0] // 8, size[1] // 8
    assert n_image == 16 + rows * cols + rows
    n_text = int((modality == data.TEXT).sum())
    assert n_image > n_text
    with torch.no_grad():
        model(**data.model_inputs(encoded))  # the processor's expansion fits the model


def test_text_only_record(model_and_processor):
    model, processor = model_and_processor
    encoded = data.encode_record(processor, _text_only(), image_folder="/nonexistent")
    assert "pixel_values" not in encoded and "image_sizes" not in encoded
    assert (encoded["modality_ids"] == data.TEXT).all()
    assert (encoded["labels"] != data.IGNORE_INDEX).sum() == 2
    with torch.no_grad():
        loss = model(**data.model_inputs(encoded), labels=encoded["labels"]).loss
    assert torch.isfinite(loss)


def test_collate_pads_right(model_and_processor, dataset):
    model, processor = model_and_processor
    encoded = [data.encode_record(processor, r, dataset["root"]) for r in dataset["records"][:3]]
    batch = data.collate(encoded, processor.tokenizer.pad_token_id)
    length = max(e["input_ids"].shape[1] for e in encoded)
    assert batch["input_ids"].shape == (3, length) and batch["pixel_values"].shape[0] == 3
    for row, e in enumerate(encoded):
        n = e["input_ids"].shape[1]
        assert torch.equal(batch["input_ids"][row, :n], e["input_ids"][0])
        assert (batch["attention_mask"][row, n:] == 0).all() and (batch["labels"][row, n:] == -100).all()
    with torch.no_grad():
        model(**data.model_inputs(batch))
    with pytest.raises(ValueError, match="with and without images"):
        data.collate(encoded[:1] + [data.encode_record(processor, _text_only(), "/x")], 0)


def test_multi_turn_labels_every_answer(model_and_processor, tmp_path):
    """Training conversations: each gpt turn is labelled, the image sits in the first turn."""
    _, processor = model_and_processor
    rng = vqa.task_rng("multi", 0)
    scene, turns = vqa.make_conversation(rng, max_objects=3, max_turns=4)
    while len(turns) < 3:
        scene, turns = vqa.make_conversation(rng, max_objects=3, max_turns=4)
    record = vqa.conversation_record(turns, "multi", 0)
    encoded = data.encode_conversation(processor, record, vqa.render(scene))
    labels = encoded["labels"][0]
    tokens = processor.tokenizer.convert_ids_to_tokens(labels[labels != data.IGNORE_INDEX].tolist())
    expected = [t for _, answer, _ in turns for t in (answer, tiny.EOT)]
    assert tokens == expected
    assert data.build_messages(record)[0]["content"][0] == {"type": "image"}
    assert all(m["content"][0]["type"] == "text" for m in data.build_messages(record)[1:])
