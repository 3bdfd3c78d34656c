"""Writing a LLaVA-NeXT model's weights under the names its adapter gives them (llava.adapter: the
llava-hf layout), shard by shard, from a model on the CPU or placed by accelerate (blocks on several
GPUs, the CPU or disk), in the files `save_pretrained` writes (config, generation config, shards,
index).

Each shard's offloaded or GPU-resident weights are brought into CPU memory only while that shard is
written, so a placed model is saved with one shard in memory at most; the shards are split on the
saved names, as `save_pretrained` splits them.
"""

from __future__ import annotations

import json
import os

from torch import nn

from mmprune.place.offload import offloaded_value, track_copy

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"


def save_placed(model: nn.Module, folder, names: dict[str, str], max_shard_size: int | str = "50GB",
                transform=None) -> dict:
    """Write `model` (config, generation config, weights) into `folder`; `names` maps each saved
    name to the runtime name of the weight stored under it. `transform`, if given, turns each shard's
    {name: tensor} into the tensors written to its file (a compressed format). Returns the tensor
    bytes of the weights (`dense`) and of what was written (`written`)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

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
    weight_map, written = {}, 0  # the names and bytes written, which a transform may change
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
        if transform is not None:
            shard = transform(shard)
        weight_map.update({key: filename for key in shard})
        written += sum(v.numel() * v.element_size() for v in shard.values())
        save_file(shard, os.path.join(folder, filename), metadata={"format": "pt"})
        shard.clear()  # the shard's copies are freed before the next shard is read
        value = None
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata, "total_size": written},
                 "weight_map": weight_map}
        with open(os.path.join(folder, SAFE_INDEX_NAME), "w", encoding="utf-8") as handle:
            handle.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return {"dense": int(split.metadata["total_size"]), "written": written}
