"""Saving a LLaVA-NeXT model that accelerate placed (blocks on several GPUs, the CPU or disk) shard
by shard, in the files `save_pretrained` writes for the same model loaded whole.

transformers' own save of an offloaded model groups the weights into shards by their runtime names
and renames them afterwards, so with several shards the weights land in other files than a plain
save puts them. Here the names are reverted first (renames only, so offloaded weights can stay on
the meta device), the shards are split on the saved names as the plain save does, and each shard's
offloaded or GPU-resident weights are brought into CPU memory only while that shard is written.
"""

from __future__ import annotations

import json
import os

from torch import nn

from mmprune.place.offload import offloaded_value, share_tied_weights, track_copy

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"


def saved_names(model: nn.Module) -> dict[str, str] | None:
    """Saved name -> runtime name of every weight to write, or None when the checkpoint format
    needs more than renaming (then the values are needed to name them)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    share_tied_weights(model)  # ties are found by identity: an offloaded head is saved as the plain save does
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    runtime_of = {id(t): name for name, t in state.items()}
    reverted = revert_weight_conversion(model, state)
    if len(reverted) != len(state) or any(id(t) not in runtime_of for t in reverted.values()):
        return None
    return {saved: runtime_of[id(t)] for saved, t in reverted.items()}


def save_placed(model: nn.Module, folder, max_shard_size: int | str = "50GB") -> bool:
    """Write `model` (config, generation config, weights) into `folder` like `save_pretrained`;
    False when its checkpoint format needs more than renames (the caller falls back to
    `save_pretrained`)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    names = saved_names(model)
    if names is None:
        return False
    os.makedirs(folder, exist_ok=True)
    # what save_pretrained writes into config.json
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)

    state = model.state_dict()
    saved = {name: state[runtime] for name, runtime in names.items()}
    split = split_torch_state_dict_into_shards(saved, filename_pattern=SAFE_WEIGHTS_NAME.replace(
        ".safetensors", "{suffix}.safetensors"), max_shard_size=max_shard_size)
    del state
    for filename, keys in split.filename_to_tensors.items():
        shard = {}
        for key in keys:
            value = saved[key]
            if value.is_meta:
                value = offloaded_value(model, names[key])  # the meter counts this read
            if value.device.type != "cpu":
                value = value.to("cpu")
                track_copy(value)
            if not value.is_contiguous():
                value = value.contiguous()
                track_copy(value)
            shard[key] = value
        save_file(shard, os.path.join(folder, filename), metadata={"format": "pt"})
        shard.clear()  # the shard's copies are freed before the next shard is read
        value = None
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
        with open(os.path.join(folder, SAFE_INDEX_NAME), "w", encoding="utf-8") as handle:
            handle.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return True
