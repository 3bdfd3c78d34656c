"""Pieces of the embedded LLaVA-NeXT trainer: probe labels, the feature tap, the sample pool."""

import random

import torch

from llava.data import collate, model_inputs
from llava.embedded import synthetic_vqa as vqa, tiny
from llava.embedded.train import PAIRS, SIDES, FeatureTap, make_pool, pair_labels


def test_pair_labels():
    red_circle = vqa.Obj("circle", "red", (215, 40, 40), 2, 40, 14)  # left, bottom
    blue_square = vqa.Obj("square", "blue", (40, 80, 215), 44, 2, 14)  # right, top
    scene = vqa.Scene(64, 64, (240, 240, 240), (red_circle, blue_square))
    labels = pair_labels([scene]).view(len(PAIRS), len(SIDES))
    assert labels.sum() == 6
    assert labels[PAIRS.index(("circle", "red"))].tolist() == [1, 1, 0, 0, 1]
    assert labels[PAIRS.index(("square", "blue"))].tolist() == [1, 0, 1, 1, 0]


def test_tap_holds_the_features_the_model_projects():
    model, processor = tiny.build(0)
    pool = make_pool(processor, random.Random(0), max_turns=2)
    pool.fill(3)
    assert pool.made == 3
    batch = collate([e for e, _ in pool.items], processor.tokenizer.pad_token_id)
    tap = FeatureTap(model)
    with torch.no_grad():
        model(**model_inputs(batch))
        pixels = batch["pixel_values"].flatten(0, 1)
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    tap.handle.remove()
    expected = hidden[model.config.vision_feature_layer][:, 1:].reshape(3, -1, hidden[0].shape[-1])
    assert torch.equal(tap.per_image(3), expected)
