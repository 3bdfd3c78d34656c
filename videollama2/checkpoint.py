"""Load and save VideoLLaMA2-AV checkpoints in the released layout.

Read: `model.safetensors` or sharded `model-*.safetensors` + `model.safetensors.index.json`
(also the `pytorch_model*.bin` variants the public pruning code writes), plus `audio_tower.bin`
when the shards lack the BEATs weights. The model is built on the meta device and the tensors are
assigned, so a 7B checkpoint is not initialised twice.

Save: the same key names, dtypes, files and shard assignment as the folder the model was read
from (so the output loads wherever the original does), config.json verbatim, every other
non-weight file copied (tokenizer, generation config, ...), and `audio_tower.bin` rewritten
from the current BEATs weights when the source had one. Checkpoint keys without a runtime
parameter (copies of BEATs' shared relative-position table in other layers, unknown extras) are
carried through unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmprune.checks import weight_files
from mmprune.errors import UserInputError
from videollama2.config import VideoLLaMA2Config

VISION_RUNTIME = "model.vision_tower.vision_tower."
VISION_CHECKPOINT = "model.vision_tower.vision_tower.vision_model."
AUDIO_PREFIX = "model.audio_tower."
AUDIO_TOWER_BIN = "audio_tower.bin"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_REL_BIAS = re.compile(r"^model\.audio_tower\.encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight$")
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3
# Upstream VideoLLaMA2 rebuilds SigLIP from the folder `mm_vision_tower` names and ignores the tower
# weights in the shards; its builder picks SigLIP only when "siglip" is in that name.
STANDALONE_VISION_TOWER = "siglip-vision-tower"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CheckpointLayout:
    """How the weights were stored, so that saving reproduces it."""

    source_dir: str
    format: str = "safetensors"  # or "bin"
    weight_map: dict[str, str] = field(default_factory=dict)  # checkpoint key -> file name
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    indexed: bool = False
    passthrough: dict[str, torch.Tensor] = field(default_factory=dict)
    audio_bin_keys: dict[str, torch.dtype] | None = None  # keys/dtypes of audio_tower.bin, if any
    audio_from_bin: bool = False  # BEATs weights came from audio_tower.bin (absent in the shards)


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise UserInputError(f"weight file {path} cannot be read ({str(exc).splitlines()[0][:200]}); the "
                             "checkpoint is damaged or incomplete") from None


def read_weights(model_dir) -> tuple[dict[str, torch.Tensor], CheckpointLayout]:
    folder = Path(model_dir)
    weight_files(folder)  # an index naming a missing shard, a truncated file: one line naming it
    layout = CheckpointLayout(source_dir=str(folder))
    files: list[str]
    for index_name, fmt in ((SAFE_INDEX, "safetensors"), (BIN_INDEX, "bin")):
        if (folder / index_name).is_file():
            try:
                weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserInputError(f"{folder / index_name} is not a valid weight index") from None
            layout.format, layout.indexed = fmt, True
            files = sorted(set(weight_map.values()))
            break
    else:
        single = [name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).is_file()]
        if not single:
            raise UserInputError(f"model folder {folder} has no weights (model.safetensors, sharded "
                                 "model-*.safetensors with an index, or pytorch_model*.bin)")
        files = single[:1]
        layout.format = "safetensors" if files[0].endswith(".safetensors") else "bin"
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise UserInputError(f"weight shard {path} listed in the index does not exist; the download is "
                                 "incomplete")
        shard = _load_weight_file(path)
        for key, value in shard.items():
            tensors[key] = value
            layout.weight_map[key] = name
    audio_bin = folder / AUDIO_TOWER_BIN
    if audio_bin.is_file():
        extra = _load_weight_file(audio_bin)
        extra = {k if k.startswith(AUDIO_PREFIX) else AUDIO_PREFIX + k: v for k, v in extra.items()}
        layout.audio_bin_keys = {k: v.dtype for k, v in extra.items()}
        if not any(k.startswith(AUDIO_PREFIX) for k in tensors):
            tensors.update(extra)
            layout.audio_from_bin = True
    layout.dtypes = {k: v.dtype for k, v in tensors.items()}
    return tensors, layout


def _vision_level(model) -> bool:
    """Whether the runtime SigLIP module keeps the `vision_model.` level (transformers < 5.6)."""
    tower = model.vision_tower
    return tower is not None and hasattr(tower.vision_tower, "vision_model")


def to_checkpoint_key(key: str, keeps_level: bool) -> str:
    if not keeps_level and key.startswith(VISION_RUNTIME):
        return VISION_CHECKPOINT + key[len(VISION_RUNTIME):]
    return key


def to_runtime_key(key: str, keeps_level: bool) -> str:
    if not keeps_level and key.startswith(VISION_CHECKPOINT):
        return VISION_RUNTIME + key[len(VISION_CHECKPOINT):]
    return key


def resolve_dtype(dtype, config: VideoLLaMA2Config, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in _DTYPES:
            raise UserInputError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return _DTYPES[dtype]
    named = config.raw.get("torch_dtype") or config.raw.get("dtype")
    if isinstance(named, str) and named in _DTYPES:
        return _DTYPES[named]
    floating = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return max(set(floating), key=floating.count) if floating else torch.float32


def load_model(cls, model_dir, dtype="auto", device="cpu"):
    """Model from a checkpoint folder, with `checkpoint_layout` recorded for saving."""
    from accelerate import init_empty_weights

    config = VideoLLaMA2Config.from_dir(model_dir)
    tensors, layout = read_weights(model_dir)
    vision_head = any(k.startswith(VISION_CHECKPOINT + "head.") for k in tensors)
    audio_predictor = any(k.startswith(AUDIO_PREFIX + "predictor.") for k in tensors)
    with init_empty_weights(include_buffers=False):
        model = cls(config, vision_head=vision_head, audio_predictor=audio_predictor)
    keeps_level = _vision_level(model)
    expected = dict(model.state_dict(keep_vars=True))
    state: dict[str, torch.Tensor] = {}
    rel_bias_copies: list[tuple[int, str]] = []
    for key, value in tensors.items():
        runtime = to_runtime_key(key, keeps_level)
        match = _REL_BIAS.match(key)
        if match and int(match.group(1)) > 0:
            rel_bias_copies.append((int(match.group(1)), key))
            layout.passthrough[key] = value
        elif runtime in expected:
            state[runtime] = value
        else:
            layout.passthrough[key] = value
    if rel_bias_copies:  # the reference shares layer 0's table: loading each copy in turn, the last wins
        table = "model.audio_tower.encoder.layers.0.self_attn.relative_attention_bias.weight"
        state[table] = tensors[max(rel_bias_copies)[1]]
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        layout.passthrough.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(to_checkpoint_key(k, keeps_level) for k in missing[:5])
        raise UserInputError(f"checkpoint {model_dir} lacks {len(missing)} weights of the model (e.g. {shown}); "
                             "the folder is incomplete or not a VideoLLaMA2.1-AV checkpoint")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UserInputError(f"checkpoint {model_dir}: {to_checkpoint_key(key, keeps_level)} has shape "
                                 f"{tuple(value.shape)}, config.json implies {tuple(expected[key].shape)}")
    target = resolve_dtype(dtype, config, tensors)
    state = {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():  # buffers built on the CPU keep their dtype; match the weights
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and name != "inv_freq":
                module._buffers[name] = buf.to(target)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise RuntimeError(f"parameters left uninitialised after loading: {still_meta[:5]}")
    model.checkpoint_layout = layout
    model.eval()
    return model.to(device)


def _shard(keys: list[str], tensors: dict[str, torch.Tensor], max_bytes: int, fmt: str) -> dict[str, str]:
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = tensors[key].numel() * tensors[key].element_size()
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


def checkpoint_state(model) -> dict[str, torch.Tensor]:
    """Checkpoint key -> tensor (CPU, contiguous, in the source dtypes), passthrough keys included."""
    keeps_level = _vision_level(model)
    layout: CheckpointLayout | None = getattr(model, "checkpoint_layout", None)
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        state[to_checkpoint_key(key, keeps_level)] = value.detach().to("cpu")
    if layout is not None:
        for key, value in layout.passthrough.items():
            match = _REL_BIAS.match(key)
            if match:  # copies of the shared table follow layer 0's current values
                value = state["model.audio_tower.encoder.layers.0.self_attn.relative_attention_bias.weight"]
            state[key] = value
        state = {k: v.to(layout.dtypes.get(k, v.dtype)) for k, v in state.items()}
    out, seen = {}, set()
    for key, value in state.items():
        value = value.contiguous()
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


def save_vision_tower_folder(model, folder, state: dict[str, torch.Tensor]) -> None:
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
    weights = {k[strip:]: v for k, v in state.items() if k.startswith(VISION_CHECKPOINT)}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tower.config.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))


def save_model(model, folder, max_shard_bytes: int = DEFAULT_SHARD_BYTES, final_dir=None) -> None:
    """Write the checkpoint into an existing empty folder (callers handle atomicity).

    With `final_dir` (where `folder` will end up), the SigLIP tower is also written as
    `final_dir/siglip-vision-tower/` and `mm_vision_tower` names that absolute path (the released
    name is kept as `mm_vision_tower_source`), so that upstream's loader runs this tower, not a
    fresh download of the original one. Moving the checkpoint breaks that path loudly (upstream
    cannot find the folder), never silently."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if final_dir is not None:
        raw = model.config.raw
        if not str(raw.get("mm_vision_tower", "")).endswith(STANDALONE_VISION_TOWER):
            raw["mm_vision_tower_source"] = raw.get("mm_vision_tower")
        raw["mm_vision_tower"] = str(Path(final_dir).resolve() / STANDALONE_VISION_TOWER)
    layout: CheckpointLayout | None = getattr(model, "checkpoint_layout", None)
    state = checkpoint_state(model)
    if final_dir is not None:
        save_vision_tower_folder(model, folder / STANDALONE_VISION_TOWER, state)
    audio_bin = None
    if layout is not None and layout.audio_bin_keys is not None:
        audio_bin = {k: state[k].to(dtype) for k, dtype in layout.audio_bin_keys.items() if k in state}
        if layout.audio_from_bin:
            state = {k: v for k, v in state.items() if not k.startswith(AUDIO_PREFIX)}
    fmt = layout.format if layout is not None else "safetensors"
    if layout is not None and set(layout.weight_map) == set(state):
        weight_map = dict(layout.weight_map)
    else:
        weight_map = _shard(list(state), state, max_shard_bytes, fmt)
    for name in sorted(set(weight_map.values())):
        part = {k: state[k] for k in state if weight_map[k] == name}
        if fmt == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, str(folder / name))
    indexed = len(set(weight_map.values())) > 1 or (layout is not None and layout.indexed)
    if indexed:
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(folder / (SAFE_INDEX if fmt == "safetensors" else BIN_INDEX), "w") as handle:
            json.dump(index, handle, indent=2)
            handle.write("\n")
    if audio_bin is not None:
        torch.save(audio_bin, str(folder / AUDIO_TOWER_BIN))
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


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # some versions warn that config.json's model_type is not a tokenizer's
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as exc:
        raise UserInputError(f"cannot load the tokenizer of {model_dir}: {str(exc).splitlines()[0][:200]}") from None
    finally:
        logging.set_verbosity(verbosity)


def load_videollama2(model_dir, dtype="auto", device="cpu"):
    """(model, tokenizer) of a checkpoint folder."""
    from videollama2.model import VideoLLaMA2ForCausalLM

    model = VideoLLaMA2ForCausalLM.from_pretrained(model_dir, dtype=dtype, device=device)
    return model, load_tokenizer(model_dir)


__all__ = ["CheckpointLayout", "load_model", "save_model", "read_weights", "load_videollama2", "load_tokenizer"]
