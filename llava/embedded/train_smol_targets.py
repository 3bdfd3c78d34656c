"""What the SmolLM2 LLaVA-NeXT trainer (llava.embedded.train_smol) learns from: the training
conversations (with an optional caption turn), the tower's per-token probe targets with the object
count, and the "soft words" the projector is first aligned to."""

from __future__ import annotations

import random

import torch

from llava.data import encode_conversation
from llava.embedded import synthetic_vqa as vqa
from llava.embedded.train import BASE_CHANNEL, CHANNELS, PAIRS, SIDES, TRAIN_TASK, token_targets
from mmprune.embedded.training import SamplePool

# The tiny trainer's probe channels plus the object count (one, two, three) on base-view tokens:
# only the base view sees the whole image, so crop tokens get the neutral 0.5, as for sides.
COUNTS = tuple(vqa.COUNT_WORDS.values())
PROBE_CHANNELS = CHANNELS + len(COUNTS)
# A base-view cell covers four crop patches (the base view is the image at half size): at the tiny
# trainer's 0.15 a quarter of the objects (those split over cells) labelled no base token, so carried
# no side there.
BASE_COVERAGE = 0.06
CAPTION_QUESTION = "describe the image."


# ------------------------------------------------------------------------------ samples


def caption(scene) -> str:
    """'red circle top left, blue square bottom': the objects left to right, each with the sides
    of the middle it clearly lies on (the margin of the position questions)."""
    words = []
    for obj in sorted(scene.objects, key=lambda o: o.center[0]):
        sides = [vqa._position_answer(obj, scene, axis) for axis in ("vertical", "horizontal")]
        words.append(" ".join([obj.color, obj.shape] + [s for s in sides if s]))
    return ", ".join(words)


def probe_targets(scene, tile: int, patch: int) -> torch.Tensor:
    """(image tokens, PROBE_CHANNELS): train.token_targets plus the count channels."""
    targets = token_targets(scene, tile, patch, BASE_COVERAGE)
    count = torch.full((len(targets), len(COUNTS)), 0.5)
    base = (tile // patch) ** 2
    count[:base] = 0.0
    count[:base, len(scene.objects) - 1] = 1.0
    return torch.cat([targets, count], dim=1)


def make_pool(processor, rng: random.Random, args, tile: int, patch: int) -> SamplePool:
    """train.make_pool's conversations, a --caption-rate share of them closed by a caption turn
    (last, so no question can read its answer from it)."""
    def make():
        scene, turns = vqa.make_conversation(rng, vqa.MAX_OBJECTS, args.max_turns)
        if args.caption_rate and rng.random() < args.caption_rate:
            turns = turns + [(CAPTION_QUESTION, caption(scene), "caption")]
        record = vqa.conversation_record(turns, TRAIN_TASK, 0)
        return encode_conversation(processor, record, vqa.render(scene)), scene, probe_targets(scene, tile, patch)
    return SamplePool(make)


# ------------------------------------------------------------------------------ soft words
#
# A decoder reads words; before any answer is back-propagated through its 30 frozen layers, the
# projector learns (cheaply: no decoder pass) to put each image token where the decoder's own
# input embeddings of the words naming it lie: the sum of the embeddings of the colour and shape
# of every object painted over the token, plus, on base-view tokens, of the sides of the middle
# its object is on and of the object count. image_newline starts as the embedding of "\n".


def word_vector(embeddings: torch.Tensor, tokenizer, word: str) -> torch.Tensor:
    """Mean of the word's input embeddings as it appears in a question (" red") and as an answer ("red")."""
    forms = [tokenizer(form, add_special_tokens=False)["input_ids"] for form in (" " + word, word)]
    return torch.stack([embeddings[ids].mean(0) for ids in forms]).mean(0)


def soft_word_basis(model, tokenizer, side_scale: float = 1.0) -> tuple:
    """((pairs, hidden), (sides, hidden)) target vectors of the probe channels."""
    embeddings = model.get_input_embeddings().weight.detach()
    pairs = torch.stack([word_vector(embeddings, tokenizer, color) + word_vector(embeddings, tokenizer, shape)
                         for shape, color in PAIRS])
    sides = side_scale * torch.stack([word_vector(embeddings, tokenizer, side) for side in SIDES])
    counts = torch.stack([word_vector(embeddings, tokenizer, count) for count in COUNTS])
    return pairs, sides, counts


def soft_word_targets(targets: torch.Tensor, basis: tuple) -> torch.Tensor:
    """(..., hidden) from probe targets (..., PROBE_CHANNELS); neutral sides and counts (0.5) add nothing."""
    pairs, sides, counts = basis
    return (targets[..., :len(PAIRS)] @ pairs + (targets[..., BASE_CHANNEL + 1:CHANNELS] == 1).float() @ sides
            + (targets[..., CHANNELS:] == 1).float() @ counts)
