"""LLaVA-NeXT side of the pruning core: where the decoder blocks are, how to run the embedding
stage of a calibration sample, and how to label each token's modality. No algorithm lives here."""

from __future__ import annotations

import torch
from torch import nn

from llava.data import IMAGE, TEXT, model_inputs
from mmprune.prune.calibration import CalibrationStore, capture_block_inputs, move_except
from mmprune.prune.towers import prune_tower_wanda

MODALITY_NAMES = {TEXT: "text", IMAGE: "image"}


def find_layer_list(root: nn.Module, suffix: str) -> tuple[str, nn.ModuleList]:
    """The first ModuleList of `root` whose items are `*{suffix}` modules, with its runtime name.
    Found by class name so it works across transformers' module-path changes."""
    for name, module in root.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__.endswith(suffix):
            return name, module
    raise ValueError(f"no list of *{suffix} modules in {type(root).__name__}")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Runtime name and list of the LLM decoder layers (e.g. model.language_model.layers)."""
    return find_layer_list(model, "DecoderLayer")


def vision_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    return find_layer_list(model, "EncoderLayer")


def _to_device(encoded: dict, device: str, dtype: torch.dtype) -> dict:
    inputs = {k: v.to(device) for k, v in model_inputs(encoded).items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def capture_decoder_inputs(model: nn.Module, samples, device: str, store_device: str, total: int) -> CalibrationStore:
    """Inputs of decoder block 0 (and its call kwargs) for every encoded sample."""
    _, layers = decoder_layers(model)
    move_except(model, layers, device)
    dtype = next(model.parameters()).dtype
    return capture_block_inputs(
        layers[0],
        lambda s: model(**_to_device(s, device, dtype), use_cache=False),
        samples,
        modality_ids_of=lambda s: s["modality_ids"],
        store_device=store_device,
        labels_of=lambda s: s.get("labels"),
        total=total,
    )


def prune_vision_tower(model: nn.Module, samples, ratio: float, device: str, store_device: str, total: int) -> dict:
    """Wanda at a uniform ratio on the CLIP encoder layers (all tiles of a sample form one batch)."""
    from mmprune.place.offload import is_dispatched

    prefix, layers = vision_layers(model)
    tower = model.model.vision_tower
    if not is_dispatched(model):  # a placed tower stays put: its hooks bring inputs to it
        tower.to(device)
    dtype = next(tower.parameters()).dtype

    def run_tower(sample):
        pixels = sample["pixel_values"].to(device, dtype)
        tower(pixels.reshape(-1, *pixels.shape[-3:]))

    return prune_tower_wanda(layers, prefix, run_tower, samples, ratio, device, store_device, total, "vision_tower")
