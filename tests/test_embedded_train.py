"""Pieces of the embedded LLaVA-NeXT trainer: per-token probe targets, the feature tap, the sample pool."""

import random

import numpy as np
import pytest
import torch

from llava.data import collate, model_inputs
from llava.embedded import synthetic_vqa as vqa, tiny
from llava.embedded.train import (BASE_CHANNEL, CHANNELS, PAIRS, SIDES, FeatureTap, layout_targets, make_pool,
                                  token_coverage, token_targets)


def test_object_masks_are_the_painted_pixels():
    scene = vqa.Scene(48, 64, (240, 240, 240), (
        vqa.Obj("triangle", "green", (40, 160, 60), 3, 5, 17),
        vqa.Obj("circle", "blue", (40, 80, 215), 40, 20, 15)))
    masks = vqa.object_masks(scene)
    painted = np.ptp(np.asarray(vqa.render(scene)).astype(int), axis=2) > 0  # grey background has no spread
    assert masks.shape == (2, 48, 64)
    assert not (masks[0] & masks[1]).any()
    assert np.array_equal(masks.any(axis=0), painted)


def test_token_targets_of_one_square_by_hand():
    # a 14-pixel red square at (2, 2): base-view cell (0, 0) is 16x16 pixels -> 196/256 covered;
    # on the 64x64 crop canvas it covers 8x8 patches (0,0) 36/64, (0,1) 48/64, (1,0) 48/64, (1,1) 1
    scene = vqa.Scene(64, 64, (240, 240, 240), (vqa.Obj("square", "red", (215, 40, 40), 2, 2, 14),))
    coverage = token_coverage(scene)[0]
    assert coverage.shape == (16 + 64,)
    expected = np.zeros(80)
    expected[0] = 196 / 256
    expected[16 + np.array([0, 1, 4, 5])] = [36 / 64, 48 / 64, 48 / 64, 1.0]
    assert np.allclose(coverage, expected)

    targets = token_targets(scene)
    assert targets.shape == (80, CHANNELS)
    pair = PAIRS.index(("square", "red"))
    assert targets[:, pair].nonzero().flatten().tolist() == [0, 16, 17, 20, 21]
    assert targets[:, :BASE_CHANNEL].sum() == 5  # no other pair anywhere
    assert targets[:, BASE_CHANNEL].nonzero().flatten().tolist() == list(range(16))
    sides = targets[:, BASE_CHANNEL + 1:]
    assert sides[0].tolist() == [1.0 if s in ("left", "top") else 0.0 for s in SIDES]
    assert bool((sides[1:] == 0.5).all())  # other base cells and every crop token: no side


def test_crop_coverage_matches_the_processor_pixels():
    """Crop tokens follow the processor's pad-and-split geometry exactly (the base view is resized
    with interpolation, so only approximately)."""
    processor = tiny.build_processor()
    image_processor = processor.image_processor
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    rng = random.Random(3)
    checked = 0
    while checked < 12:
        scene = vqa.random_scene(rng, 3)
        if scene is None:
            continue
        pixels = image_processor(images=[vqa.render(scene)], return_tensors="pt")["pixel_values"][0]
        pixels = pixels * std + mean
        coloured = (pixels.amax(1) - pixels.amin(1)) > 0.3  # (tiles, 32, 32); background and padding are grey/black
        per_token = coloured.view(5, 4, 8, 4, 8).float().mean((2, 4)).flatten().numpy()
        coverage = token_coverage(scene).sum(axis=0)
        assert np.allclose(per_token[16:], coverage[16:])
        assert np.abs(per_token[:16] - coverage[:16]).max() < 0.2
        checked += 1


def test_tap_holds_the_features_the_model_projects():
    model, processor = tiny.build(0)
    pool = make_pool(processor, random.Random(0), max_turns=2)
    pool.fill(3)
    assert pool.made == 3
    batch = collate([e for e, *_ in pool.items], processor.tokenizer.pad_token_id)
    tap = FeatureTap(model)
    with torch.no_grad():
        model(**model_inputs(batch))
        pixels = batch["pixel_values"].flatten(0, 1)
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    tap.handle.remove()
    expected = hidden[model.config.vision_feature_layer][:, 1:].reshape(3, -1, hidden[0].shape[-1])
    assert torch.equal(tap.per_image(3), expected)


def test_layout_targets_follow_the_models_token_packing():
    """Feed LLaVA-NeXT's own packing features that carry each patch's canvas column and row, and
    check the probe's left/top targets against where each packed token really lies."""
    model, _ = tiny.build(0)
    per_side = tiny.TILE // tiny.PATCH
    width = model.config.text_config.hidden_size
    for height, image_width in vqa.IMAGE_SIZES:
        features = torch.zeros(5, per_side * per_side, width)
        for tile in range(5):
            for patch in range(per_side * per_side):
                row, col = divmod(patch, per_side)
                if tile:  # crops of the 2x2 canvas, row-major; the base view spans the image alone
                    row, col = row + per_side * ((tile - 1) // 2), col + per_side * ((tile - 1) % 2)
                    features[tile, patch, :3] = torch.tensor([col, row, 1.0])
                else:
                    features[tile, patch, :3] = torch.tensor([col * 2, row * 2, 1.0])
        newline = torch.zeros(width)
        newline[2] = -1.0
        packed_list, _ = model.model.pack_image_features(
            [features], torch.tensor([[height, image_width]]), "default", image_newline=newline)
        packed = packed_list[0]
        targets = layout_targets(height, image_width, packed.shape[0])
        is_patch = packed[:, 2] == 1
        assert torch.equal(targets[:, 2] == 1, is_patch)  # newlines carry no target
        # the unpadded crops are centred, so the image's middle is the canvas middle (column/row 4)
        assert torch.equal(targets[is_patch, 0] == 1, packed[is_patch, 0] < per_side)
        assert torch.equal(targets[is_patch, 1] == 1, packed[is_patch, 1] < per_side)
    with pytest.raises(ValueError, match="has 88 tokens, the prompt 87"):
        layout_targets(64, 64, 87)


def test_scene_questions_never_repeat_what_an_earlier_turn_said():
    rng = random.Random(11)
    for _ in range(300):
        scene, turns = vqa.make_conversation(rng, vqa.MAX_OBJECTS, 10)
        said = []
        kinds = [kind for _, _, kind in turns]
        if "count" in kinds:
            assert "position" not in kinds[:kinds.index("count")]
        for question, answer, kind in turns:
            words = set(question.rstrip("?").split())
            if kind in ("color", "shape"):  # the other attribute of that object was never named with it
                asked = (words & set(vqa.SHAPES)) if kind == "color" else (words & set(vqa.COLORS))
                assert not any(asked <= earlier and answer in earlier for earlier in said)
            said.append(words | {answer})
        assert len({q for q, _, _ in turns}) == len(turns)
