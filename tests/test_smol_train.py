"""Pieces of the SmolLM2 LLaVA-NeXT trainer (llava/embedded/train_smol*.py), on the tiny model: the
cached top-layer loss, soft-word targets, count channels, captions, and the LoRA merge."""

import copy
import random

import pytest
import torch

from llava.data import collate
from llava.embedded import smol, synthetic_vqa as vqa, tiny, train
from llava.embedded import train_smol_lora, train_smol_stages, train_smol_targets


@pytest.fixture(scope="module")
def tiny_model():
    model, processor = tiny.build(0)
    return model.eval(), processor


def test_cached_top_layers_give_the_whole_decoder_loss(tiny_model):
    model, processor = tiny_model
    pool = train.make_pool(processor, random.Random(0), max_turns=3)
    pool.fill(2)
    items = pool.items
    assert items[0][0]["input_ids"].shape != items[1][0]["input_ids"].shape  # padding is exercised
    batch = collate([e for e, *_ in items], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        whole = train_smol_stages.answer_loss(model, batch)
        for layer in (1, 3):
            cached = [{"hidden": train_smol_stages.hidden_entering(model, layer, e, bf16=False)} for e, *_ in items]
            hidden = train_smol_stages.pad_hidden([(c,) for c in cached], batch["input_ids"].shape[1])
            top = train_smol_stages.top_answer_loss(model, layer, hidden, batch)
            torch.testing.assert_close(top, whole, rtol=1e-5, atol=1e-6)
    assert len(model.model.language_model.layers) == 4  # the full list is back


def test_count_channels_and_soft_words(tiny_model):
    model, processor = tiny_model
    scene = vqa.Scene(64, 64, (240, 240, 240), (
        vqa.Obj("square", "red", (215, 40, 40), 2, 2, 14),
        vqa.Obj("circle", "blue", (40, 80, 215), 44, 44, 16)))
    # hand-checked on 16x16 patches (2x2 per tile): base token 0 is the image's top-left quadrant
    targets = train_smol_targets.probe_targets(scene, 32, 16)
    base = 4
    assert targets.shape == (base + 16, train_smol_targets.PROBE_CHANNELS)
    # the default 8x8 patches: 4x4 base tokens, 8x8 crop tokens over the 2x2 tiles
    fine = train_smol_targets.probe_targets(scene, smol.TILE, smol.PATCH)
    assert (smol.TILE, smol.PATCH) == (32, 8) and fine.shape == (16 + 64, train_smol_targets.PROBE_CHANNELS)
    assert fine[:16, train.CHANNELS:].tolist() == [[0.0, 1.0, 0.0]] * 16
    count = targets[:, train.CHANNELS:]
    assert count[:base].tolist() == [[0.0, 1.0, 0.0]] * base  # "two" on every base-view token
    assert bool((count[base:] == 0.5).all())

    basis = train_smol_targets.soft_word_basis(model, processor.tokenizer)
    words = train_smol_targets.soft_word_targets(targets, basis)
    embeddings = model.get_input_embeddings().weight

    def vector(word):
        return train_smol_targets.word_vector(embeddings, processor.tokenizer, word).detach()

    # base token 0 (top-left quadrant) holds the red square, left and top, two objects
    expected = vector("red") + vector("square") + vector("left") + vector("top") + vector("two")
    torch.testing.assert_close(words[0], expected)
    # crop token 0 (first crop, top-left patch) holds only the square: no sides, no count
    torch.testing.assert_close(words[base], vector("red") + vector("square"))
    assert not words[base + 5].any()  # a background patch


def test_caption_names_objects_left_to_right_with_clear_sides():
    scene = vqa.Scene(48, 64, (240, 240, 240), (
        vqa.Obj("circle", "yellow", (230, 195, 30), 44, 2, 16),
        vqa.Obj("triangle", "green", (40, 160, 60), 2, 30, 16),
        vqa.Obj("square", "red", (215, 40, 40), 26, 16, 14)))  # centred vertically: no top / bottom
    assert train_smol_targets.caption(scene) == "green triangle bottom left, red square, yellow circle top right"


def test_lora_merge_matches_peft(tiny_model, tmp_path):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(tiny_model[0])
    names = ["model.language_model.layers.1.self_attn.q_proj", "model.language_model.layers.3.mlp.up_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=names))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    reference = copy.deepcopy(peft_model).merge_and_unload()
    peft_model.save_pretrained(tmp_path)
    merged = train_smol_lora.merge_lora_in_place(peft_model, tmp_path)
    for name in names:
        got, want = merged.get_submodule(name).weight, reference.get_submodule(name).weight
        assert not torch.equal(got, tiny_model[0].get_submodule(name).weight)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert set(smol.lora_deltas(tmp_path)) == {f"{n}.weight" for n in names}
