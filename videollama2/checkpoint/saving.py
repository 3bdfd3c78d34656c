"""Saving a checkpoint in the layout it was read in, one weight file at a time, with its side files."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmprune.place.offload import offloaded_value, track_copy
from videollama2.checkpoint.keys import (
    AUDIO_PREFIX,
    AUDIO_TOWER_BIN,
    BIN_INDEX,
    REL_BIAS_TABLE,
    SAFE_INDEX,
    VISION_CHECKPOINT,
    VISION_RUNTIME,
    _REL_BIAS,
    _WEIGHT_FILE,
    _vision_level,
    to_checkpoint_key,
)
from videollama2.checkpoint.reading import CheckpointLayout
from videollama2.config import VideoLLaMA2Config

DEFAULT_SHARD_BYTES = 5 * 1024 ** 3
# Upstream VideoLLaMA2 rebuilds SigLIP from the folder `mm_vision_tower` names and ignores the tower
# weights in the shards; its builder picks SigLIP only when "siglip" is in that name.
STANDALONE_VISION_TOWER = "siglip-vision-tower"


def _shard(keys: list[str], sizes: dict[str, int], max_bytes: int, fmt: str) -> dict[str, str]:
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = sizes[key]
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if len(groups) == 1:
        return {k: f"{stem}.{ext}" for k in groups[0]}
    n = len(groups)
    return {k: f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i, group in enumerate(groups) for k in group}


@dataclass
class _Entry:
    """One tensor of the checkpoint to write: what holds it now and the dtype it is saved in."""

    runtime: str | None  # the model's parameter or buffer name; None for a passthrough tensor
    held: torch.Tensor  # the model's tensor (on the meta device when offloaded) or the passthrough value
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.held.numel() * self.dtype.itemsize


def checkpoint_entries(model) -> dict[str, _Entry]:
    """Checkpoint key -> what to write, passthrough keys included; nothing is read or copied yet."""
    keeps_level = _vision_level(model)
    layout: CheckpointLayout | None = getattr(model, "checkpoint_layout", None)
    entries: dict[str, _Entry] = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        entries[to_checkpoint_key(key, keeps_level)] = _Entry(key, value, value.dtype)
    if layout is not None:
        for key, value in layout.passthrough.items():
            if _REL_BIAS.match(key):  # copies of the shared table follow layer 0's current values
                table = entries[REL_BIAS_TABLE]
                entries[key] = _Entry(table.runtime, table.held, value.dtype)
            else:
                entries[key] = _Entry(None, value, value.dtype)
        for key, entry in entries.items():
            entry.dtype = layout.dtypes.get(key, entry.dtype)
    return entries


def _materialise(model, entry: _Entry) -> torch.Tensor:
    """The tensor on the CPU, in its saved dtype, contiguous; a weight offloaded to disk is read
    from its store, and every copy made is reported to the run's meter (mmprune.place.offload)."""
    value = entry.held
    if value.is_meta:
        value = offloaded_value(model, entry.runtime)
    out = value.detach().to("cpu", entry.dtype).contiguous()
    if out.untyped_storage().data_ptr() != value.untyped_storage().data_ptr() or out.device != value.device:
        track_copy(out)
    return out


def checkpoint_state(model) -> dict[str, torch.Tensor]:
    """Checkpoint key -> tensor (CPU, contiguous, in the source dtypes), passthrough keys included,
    all in memory at once (saving goes shard by shard instead)."""
    out, seen = {}, set()
    for key, entry in checkpoint_entries(model).items():
        value = _materialise(model, entry)
        if value.data_ptr() in seen:  # safetensors refuses shared storage
            value = value.clone()
        seen.add(value.data_ptr())
        out[key] = value
    return out


def vision_tower_inside(config: VideoLLaMA2Config, model_dir) -> bool:
    """True when `mm_vision_tower` names a folder inside `model_dir` (a tower this project saved)."""
    name = config.vision_tower_name
    if not name:
        return False
    tower, root = Path(name).resolve(), Path(model_dir).resolve()
    return tower == root or root in tower.parents


def save_vision_tower_folder(model, folder, entries: dict[str, _Entry]) -> None:
    """The SigLIP tower as a standalone transformers folder (weights, config, image processor).
    Weights keep the released `vision_model.*` names (not save_pretrained's): transformers 5
    flattens SiglipVisionModel and strips that prefix on load, older releases need it."""
    from transformers import SiglipImageProcessor
    from transformers.utils import logging

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tower = model.vision_tower.vision_tower
    size = tower.config.image_size
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # without torchvision it says it falls back to the PIL backend
    try:
        # squash resize, bicubic, mean = std = 0.5: what upstream and videollama2/media.py do
        processor = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                         image_std=[0.5] * 3)
    finally:
        logging.set_verbosity(verbosity)
    strip = len(VISION_RUNTIME)
    weights = {k[strip:]: _materialise(model, e) for k, e in entries.items() if k.startswith(VISION_CHECKPOINT)}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    weights.clear()
    tower.config.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def save_model(model, folder, max_shard_bytes: int = DEFAULT_SHARD_BYTES, final_dir=None,
               keep_layout: bool = True) -> None:
    """Write the checkpoint into an existing empty folder (callers handle atomicity), one weight
    file at a time: a model accelerate placed (blocks on GPUs or offloaded to disk) has only one
    file's offloaded or GPU-resident weights copied into CPU memory at once.

    With `final_dir` (where `folder` will end up), the SigLIP tower is also written as
    `final_dir/siglip-vision-tower/` and `mm_vision_tower` names that absolute path (the released
    name is kept as `mm_vision_tower_source`), so that upstream's loader runs this tower, not a
    fresh download of the original one. Moving the checkpoint breaks that path loudly (upstream
    cannot find the folder), never silently. The files and shards of the folder the model was read
    from are kept, unless `keep_layout` is False (then shards of at most `max_shard_bytes`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if final_dir is not None:
        raw = model.config.raw
        if not str(raw.get("mm_vision_tower", "")).endswith(STANDALONE_VISION_TOWER):
            raw["mm_vision_tower_source"] = raw.get("mm_vision_tower")
        raw["mm_vision_tower"] = str(Path(final_dir).resolve() / STANDALONE_VISION_TOWER)
    layout: CheckpointLayout | None = getattr(model, "checkpoint_layout", None)
    entries = checkpoint_entries(model)
    if final_dir is not None:
        save_vision_tower_folder(model, folder / STANDALONE_VISION_TOWER, entries)
    if layout is not None and layout.audio_bin_keys is not None:
        # one pickle: the BEATs weights are in memory together while it is written
        audio_bin = {k: _materialise(model, _Entry(entries[k].runtime, entries[k].held, dtype))
                     for k, dtype in layout.audio_bin_keys.items() if k in entries}
        torch.save(audio_bin, str(folder / AUDIO_TOWER_BIN))
        audio_bin.clear()
        if layout.audio_from_bin:
            entries = {k: v for k, v in entries.items() if not k.startswith(AUDIO_PREFIX)}
    fmt = layout.format if layout is not None else "safetensors"
    sizes = {k: e.nbytes for k, e in entries.items()}
    if keep_layout and layout is not None and set(layout.weight_map) == set(entries):
        weight_map = dict(layout.weight_map)
    else:
        weight_map = _shard(list(entries), sizes, max_shard_bytes, fmt)
    for name in sorted(set(weight_map.values())):
        part, seen = {}, set()
        for key in (k for k in entries if weight_map[k] == name):
            value = _materialise(model, entries[key])
            if value.data_ptr() in seen:  # safetensors refuses shared storage
                value = value.clone()
                track_copy(value)
            seen.add(value.data_ptr())
            part[key] = value
        if fmt == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, str(folder / name))
        part.clear()  # this file's copies are freed before the next file is read
        value = None
    indexed = len(set(weight_map.values())) > 1 or (layout is not None and layout.indexed)
    if indexed:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        with open(folder / (SAFE_INDEX if fmt == "safetensors" else BIN_INDEX), "w") as handle:
            json.dump(index, handle, indent=2)
            handle.write("\n")
    model.config.save(folder)
    if layout is not None:
        copy_side_files(layout.source_dir, folder)


def copy_side_files(source, target) -> None:
    """Tokenizer, generation config and other non-weight files of the source folder."""
    for entry in sorted(Path(source).iterdir()):
        name = entry.name
        if not entry.is_file() or name.startswith(".") or name == "config.json" or name == AUDIO_TOWER_BIN:
            continue
        if _WEIGHT_FILE.match(name) or name in (SAFE_INDEX, BIN_INDEX):
            continue
        if not (Path(target) / name).exists():
            shutil.copy2(entry, Path(target) / name)
