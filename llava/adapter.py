"""LLaVA-NeXT's adapter for the core (mmprune.base.adapters), registered for model_type `llava_next`:
how to load, find the decoder blocks, capture calibration inputs, label modalities, build the model from
its config alone, and save. Registered through the `mmprune.adapters` entry point (pyproject.toml)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from llava.convert import load_llava_next
from llava.data import leave_bos_to_tokenizer
from llava.model import MODALITY_NAMES, capture_decoder_inputs, decoder_layers
from llava.placed_save import save_placed
from mmprune.base.adapters import ModelAdapter, register
from mmprune.place.offload import is_dispatched


def empty_model(model_path: Path):
    """The model of a llava-hf folder's config.json, for the planner (call under init_empty_weights)."""
    from transformers import AutoConfig, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration(AutoConfig.from_pretrained(str(model_path)))


def load(model_path, dtype="auto", device_map=None, offload_folder=None):
    return load_llava_next(model_path, dtype=dtype, device_map=device_map, offload_folder=offload_folder)


def save(model, processor, folder, max_shard_size=None) -> None:
    """The checkpoint in the files `save_pretrained` writes, from a model on the CPU or placed by
    accelerate (shard by shard), and the processor with a chat template that writes no BOS."""
    size = {"max_shard_size": max_shard_size} if max_shard_size else {}
    if not is_dispatched(model):
        model.to("cpu").save_pretrained(folder, **size)
    elif not save_placed(model, folder, **size):
        # a format that needs the values to name them: transformers' own save of a placed model
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            model.save_pretrained(folder, **size)
    # one BOS for tools that tokenise the rendered template with special tokens (lmms-eval)
    if leave_bos_to_tokenizer(processor):
        print("mmprune: the saved chat template no longer writes BOS (the tokenizer adds it)", file=sys.stderr)
    processor.save_pretrained(folder)


ADAPTER = register(ModelAdapter(
    model_type="llava_next", family="LLaVA-NeXT", modality_names=MODALITY_NAMES, load=load,
    decoder_blocks=decoder_layers, capture=capture_decoder_inputs, empty_model=empty_model, save=save,
))
