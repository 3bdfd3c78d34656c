"""VideoLLaMA2-AV side of the pruning core: the embedding stage of a calibration sample (towers,
projectors, splicing), its per-token modality ids, and the tower layers for
--vit_sparsity_ratio / --aud_sparsity_ratio. No algorithm lives here: everything is the core's
capture, driver and Wanda pruner."""

from __future__ import annotations

import torch
from torch import nn

from mmprune.prune.calibration import CalibrationStore, capture_block_inputs, move_except
from mmprune.place.offload import is_dispatched
from mmprune.prune.towers import prune_tower_wanda
from videollama2.model import VideoLLaMA2ForCausalLM, decoder_layers


def capture_decoder_inputs(model: VideoLLaMA2ForCausalLM, samples, device: str, store_device: str,
                           total: int) -> CalibrationStore:
    """Inputs of decoder block 0 (with its call kwargs), the spliced modality ids and the answer
    labels of every encoded sample (batch of one, no padding)."""
    _, layers = decoder_layers(model)
    move_except(model, layers, device)
    if model.config.tie_word_embeddings and not is_dispatched(model):  # the head shares the embedding: keep them together
        model.lm_head.weight = model.model.embed_tokens.weight
    seen: dict = {}

    def run(sample):
        spliced = model.embed_inputs(sample["input_ids"].to(device), None, sample["labels"].to(device),
                                     sample.get("video"), sample.get("audio"))
        seen["modality"], seen["labels"] = spliced.modality_ids[0], spliced.labels
        model.model(inputs_embeds=spliced.inputs_embeds, attention_mask=None, use_cache=False)

    return capture_block_inputs(layers[0], run, samples, modality_ids_of=lambda s: seen["modality"],
                                store_device=store_device, labels_of=lambda s: seen["labels"].to(store_device),
                                total=total)


def tower_layers(model: VideoLLaMA2ForCausalLM, which: str) -> tuple[str, nn.ModuleList, nn.Module]:
    """(runtime prefix, layer list, tower module) of the vision ("vit") or audio ("aud") tower."""
    if which == "vit":
        tower = model.vision_tower
        inner = "vision_model." if hasattr(tower.vision_tower, "vision_model") else ""
        return f"model.vision_tower.vision_tower.{inner}encoder.layers", tower.layers, tower
    tower = model.audio_tower
    return "model.audio_tower.encoder.layers", tower.encoder.layers, tower


@torch.no_grad()
def prune_tower(model: VideoLLaMA2ForCausalLM, which: str, samples, ratio: float, device: str, store_device: str,
                total: int) -> dict:
    """Wanda at a uniform ratio on the vision ("vit") or audio ("aud") tower's encoder layers, with
    the core's tower pruning (the inputs are the calibration samples' frames or fbank features)."""
    prefix, layers, tower = tower_layers(model, which)
    if tower is None:
        raise ValueError(f"the model has no {'vision' if which == 'vit' else 'audio'} tower")
    if not is_dispatched(model):  # a placed tower stays put: its hooks bring inputs to it
        tower.to(device)
    dtype = next(tower.parameters()).dtype
    key = "video" if which == "vit" else "audio"

    def run(sample):
        data = sample[key].to(device, dtype)
        tower(data.flatten(0, 1) if which == "vit" else data)

    usable = (s for s in samples if key in s)
    label = "vision_tower" if which == "vit" else "audio_tower"
    return prune_tower_wanda(layers, prefix, run, usable, ratio, device, store_device, total, label)
