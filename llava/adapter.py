"""LLaVA-NeXT's adapter for the core (mmprune.base.adapters), registered for model_type `llava_next`:
how to load, find the decoder blocks, capture calibration inputs, label modalities, build the model from
its config alone, and save. Registered through the `mmprune.adapters` entry point (pyproject.toml)."""

from __future__ import annotations

import sys
from pathlib import Path

from llava.convert.loading import load_llava_next
from llava.data import leave_bos_to_tokenizer
from llava.model import MODALITY_NAMES, capture_decoder_inputs, decoder_layers
from llava.placed_save import save_placed
from mmprune.base.adapters import ModelAdapter, register
from mmprune.base.sparse_format import SparseWriter, check_save_format, format_for
from mmprune.place.offload import share_tied_weights


def empty_model(model_path: Path):
    """The model of a llava-hf folder's config.json, for the planner (call under init_empty_weights)."""
    from transformers import AutoConfig, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration(AutoConfig.from_pretrained(str(model_path)))


def load(model_path, dtype="auto", device_map=None, offload_folder=None):
    return load_llava_next(model_path, dtype=dtype, device_map=device_map, offload_folder=offload_folder)


# The llava-hf checkpoints' names (the hub's llava-hf LLaVA-NeXT releases, which vLLM's loader needs and
# transformers reads), by the runtime module that holds the weight in transformers 5.x.
# transformers reads them through its checkpoint conversion mapping (entries `llava_next` and
# `CLIPVisionModel`, the latter dropping `vision_model.`), but its own save of a model built from a
# config writes the CLIP tower without `vision_model.`, which vLLM refuses: names are set here, not
# left to the installed transformers.
LLAVA_HF_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower.vision_model."),  # a CLIP tower that keeps it
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)


def llava_hf_name(runtime: str) -> str:
    """The llava-hf checkpoint name of the weight at runtime name `runtime`."""
    for prefix, saved in LLAVA_HF_PREFIXES:
        if runtime.startswith(prefix):
            return saved + runtime[len(prefix):]
    raise ValueError(f"{runtime} is no weight of a LLaVA-NeXT model in transformers 5.x; "
                     "its llava-hf name is unknown")


def llava_hf_names(model) -> dict[str, str]:
    """llava-hf name -> runtime name of every weight a checkpoint holds (tied copies left out, as
    `save_pretrained` leaves them)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    share_tied_weights(model)  # ties are found by identity: an offloaded head is saved as the plain save does
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return {llava_hf_name(name): name for name in state}


def decoder_linear_names(model) -> set[str]:
    """llava-hf names of the decoder linears' weights (what the pruners prune)."""
    from torch import nn

    prefix, layers = decoder_layers(model)
    return {llava_hf_name(f"{prefix}.{i}.{name}.weight") for i, layer in enumerate(layers)
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


def save_weights(model, folder, max_shard_size=None, save_format="dense", sparsity_type="unstructured") -> dict:
    """config.json, generation_config.json and the weights in the llava-hf layout, from a model on the
    CPU or placed by accelerate (shard by shard): every LLaVA-NeXT checkpoint the project writes
    (pruned, EAS, the embedded models) goes through here. save_format "compressed" writes the
    decoder linears in compressed-tensors' sparse format for `sparsity_type` (mmprune.base.sparse_format).
    Returns the tensor bytes written (and the compression summary)."""
    writer = None
    if save_format == "compressed":
        writer = SparseWriter(format_for(sparsity_type), decoder_linear_names(model))
    elif save_format != "dense":
        check_save_format(save_format)
    tensor_bytes = save_placed(model, folder, llava_hf_names(model), max_shard_size=max_shard_size or "50GB",
                               transform=writer)
    info = {"save_format": save_format, "tensor_bytes": tensor_bytes}
    if writer is not None:
        info["compression"] = writer.write_config(folder)
    return info


def save(model, processor, folder, max_shard_size=None, save_format="dense", sparsity_type="unstructured") -> dict:
    """The checkpoint (`save_weights`) and the processor with a chat template that writes no BOS."""
    info = save_weights(model, folder, max_shard_size, save_format, sparsity_type)
    # one BOS for tools that tokenise the rendered template with special tokens (lmms-eval)
    if leave_bos_to_tokenizer(processor):
        print("mmprune: the saved chat template no longer writes BOS (the tokenizer adds it)", file=sys.stderr)
    processor.save_pretrained(folder)
    return info


ADAPTER = register(ModelAdapter(
    model_type="llava_next", family="LLaVA-NeXT", modality_names=MODALITY_NAMES, load=load,
    decoder_blocks=decoder_layers, capture=capture_decoder_inputs, empty_model=empty_model, save=save,
))
