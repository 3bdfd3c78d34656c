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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mmprune.run.checks import check_tokenizer_files, weight_files
from mmprune.base.errors import UserInputError, one_line
from mmprune.place.offload import offloaded_value, track_copy
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
REL_BIAS_TABLE = "model.audio_tower.encoder.layers.0.self_attn.relative_attention_bias.weight"


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


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _unreadable(path: Path, exc: Exception) -> UserInputError:
    return UserInputError(f"weight file {path} cannot be read ({str(exc).splitlines()[0][:200]}); the "
                          "checkpoint is damaged or incomplete")


class _WeightFile:
    """One weight file whose tensors are read when asked for: safetensors through safe_open,
    .bin through a memory map, so that weights placed on disk are never brought into memory."""

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        self._tensors: dict[str, torch.Tensor] | None = None
        try:
            if path.suffix == ".safetensors":
                self._handle = safe_open(str(path), framework="pt", device="cpu")
            else:
                try:
                    self._tensors = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:
                    if "mmap" not in str(exc):
                        raise
                    self._tensors = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise _unreadable(path, exc) from None

    def keys(self) -> list[str]:
        return list(self._handle.keys()) if self._handle is not None else list(self._tensors)

    def get(self, key: str) -> torch.Tensor:
        if self._handle is None:
            return self._tensors[key]
        try:
            return self._handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise _unreadable(self.path, exc) from None

    def dtype(self, key: str) -> torch.dtype:
        if self._handle is None:
            return self._tensors[key].dtype
        name = self._handle.get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES[name] if name in _SAFETENSORS_DTYPES else self.get(key).dtype

    def shape(self, key: str) -> tuple[int, ...]:
        if self._handle is None:
            return tuple(self._tensors[key].shape)
        return tuple(self._handle.get_slice(key).get_shape())


class CheckpointWeights:
    """Checkpoint key -> the file (and the key inside it) holding its tensor, read on demand."""

    def __init__(self):
        self.where: dict[str, tuple[_WeightFile, str]] = {}

    def add(self, source: _WeightFile, key: str, inner: str | None = None) -> None:
        self.where[key] = (source, inner or key)

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        source, inner = self.where[key]
        return source.get(inner)

    def dtype(self, key: str) -> torch.dtype:
        source, inner = self.where[key]
        return source.dtype(inner)

    def shape(self, key: str) -> tuple[int, ...]:
        source, inner = self.where[key]
        return source.shape(inner)

    def safetensors_file(self, key: str) -> tuple[str, str] | None:
        """(file, key inside it) when the tensor can be read straight from a safetensors file."""
        source, inner = self.where[key]
        return (str(source.path.absolute()), inner) if source.path.suffix == ".safetensors" else None


def open_weights(model_dir) -> tuple[CheckpointWeights, CheckpointLayout]:
    """The checkpoint's tensors, located but not read, and the layout saving reproduces."""
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
    weights = CheckpointWeights()
    for name in files:
        path = folder / name
        if not path.is_file():
            raise UserInputError(f"weight shard {path} listed in the index does not exist; the download is "
                                 "incomplete")
        source = _WeightFile(path)
        for key in source.keys():
            weights.add(source, key)
            layout.weight_map[key] = name
    audio_bin = folder / AUDIO_TOWER_BIN
    if audio_bin.is_file():
        source = _WeightFile(audio_bin)
        named = {k if k.startswith(AUDIO_PREFIX) else AUDIO_PREFIX + k: k for k in source.keys()}
        layout.audio_bin_keys = {k: source.dtype(inner) for k, inner in named.items()}
        if not any(k.startswith(AUDIO_PREFIX) for k in weights.keys()):
            for key, inner in named.items():
                weights.add(source, key, inner)
            layout.audio_from_bin = True
    layout.dtypes = {k: weights.dtype(k) for k in weights.keys()}
    return weights, layout


def optional_modules(model_dir) -> dict[str, bool]:
    """Which unused modules the checkpoint carries (SigLIP's head, BEATs' predictor), from the
    weight files' key lists alone: the model is built with them so that they are saved again."""
    folder = Path(model_dir)
    keys: list[str] = []
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (folder / index_name).is_file():
            try:
                keys = list(json.loads((folder / index_name).read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserInputError(f"{folder / index_name} is not a valid weight index") from None
            break
    else:
        keys = open_weights(folder)[0].keys()
    if (folder / AUDIO_TOWER_BIN).is_file() and not any(k.startswith(AUDIO_PREFIX) for k in keys):
        keys += [AUDIO_PREFIX + k for k in _WeightFile(folder / AUDIO_TOWER_BIN).keys()]
    return {"vision_head": any(k.startswith(VISION_CHECKPOINT + "head.") for k in keys),
            "audio_predictor": any(k.startswith(AUDIO_PREFIX + "predictor.") for k in keys)}


def read_weights(model_dir) -> tuple[dict[str, torch.Tensor], CheckpointLayout]:
    """Every tensor of the checkpoint in memory, and its layout."""
    weights, layout = open_weights(model_dir)
    return {k: weights.get(k) for k in weights.keys()}, layout


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


def resolve_dtype(dtype, config: VideoLLaMA2Config, stored) -> torch.dtype:
    """The dtype to load in: `dtype` itself, config.json's, or the one most stored tensors have
    (`stored`: the tensors, or their dtypes)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in _DTYPES:
            raise UserInputError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return _DTYPES[dtype]
    named = config.raw.get("torch_dtype") or config.raw.get("dtype")
    if isinstance(named, str) and named in _DTYPES:
        return _DTYPES[named]
    values = stored.values() if isinstance(stored, dict) else stored
    floating = [d for d in (v.dtype if torch.is_tensor(v) else v for v in values) if d.is_floating_point]
    return max(set(floating), key=floating.count) if floating else torch.float32


def _torch_device(device) -> torch.device:
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def load_model(cls, model_dir, dtype="auto", device="cpu", device_map=None, offload_dir=None, main_device=None):
    """Model from a checkpoint folder, with `checkpoint_layout` recorded for saving.

    With `device_map` (module -> GPU index, "cpu" or "disk", e.g. from mmprune.place.plan.make_plan)
    each weight is read straight onto its device and accelerate's hooks are attached
    (`dispatch_model`); weights placed on disk are not read at all: the hooks read them from the
    checkpoint's safetensors file (a .bin checkpoint's are first copied into `offload_dir`)."""
    from accelerate import init_empty_weights

    from mmprune.place.plan import device_of

    config = VideoLLaMA2Config.from_dir(model_dir)
    weights, layout = open_weights(model_dir)
    keys = weights.keys()
    vision_head = any(k.startswith(VISION_CHECKPOINT + "head.") for k in keys)
    audio_predictor = any(k.startswith(AUDIO_PREFIX + "predictor.") for k in keys)
    with init_empty_weights(include_buffers=False):
        model = cls(config, vision_head=vision_head, audio_predictor=audio_predictor)
    keeps_level = _vision_level(model)
    expected = dict(model.state_dict(keep_vars=True))
    sources: dict[str, str] = {}  # runtime name -> checkpoint key
    rel_bias_copies: list[tuple[int, str]] = []
    for key in keys:
        runtime = to_runtime_key(key, keeps_level)
        match = _REL_BIAS.match(key)
        if match and int(match.group(1)) > 0:
            rel_bias_copies.append((int(match.group(1)), key))
            layout.passthrough[key] = weights.get(key)
        elif runtime in expected:
            sources[runtime] = key
        else:
            layout.passthrough[key] = weights.get(key)
    if rel_bias_copies:  # the reference shares layer 0's table: loading each copy in turn, the last wins
        sources[REL_BIAS_TABLE] = max(rel_bias_copies)[1]
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        layout.passthrough.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sources))
    if missing:
        shown = ", ".join(to_checkpoint_key(k, keeps_level) for k in missing[:5])
        raise UserInputError(f"checkpoint {model_dir} lacks {len(missing)} weights of the model (e.g. {shown}); "
                             "the folder is incomplete or not a VideoLLaMA2.1-AV checkpoint")
    for runtime, key in sources.items():
        if weights.shape(key) != tuple(expected[runtime].shape):
            raise UserInputError(f"checkpoint {model_dir}: {to_checkpoint_key(runtime, keeps_level)} has shape "
                                 f"{weights.shape(key)}, config.json implies {tuple(expected[runtime].shape)}")
    target = resolve_dtype(dtype, config, [weights.dtype(k) for k in keys])
    state: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}  # disk-placed weights: where accelerate's hooks read them
    on_disk: list[str] = []
    for runtime, key in sources.items():
        where = device_of(runtime, device_map) if device_map else "cpu"
        floating = weights.dtype(key).is_floating_point
        if where == "disk":
            on_disk.append(runtime)
            direct = weights.safetensors_file(key)
            if direct is not None:
                index[runtime] = {"safetensors_file": direct[0], "weight_name": direct[1],
                                  "dtype": str(target if floating else weights.dtype(key)).removeprefix("torch.")}
            else:
                if offload_dir is None:
                    raise UserInputError("the placement sends weights to disk; an offload folder is needed")
                from accelerate.utils import offload_weight

                value = weights.get(key)
                offload_weight(value.to(target) if floating else value, runtime, offload_dir, index=index)
            continue
        value = weights.get(key)
        value = value.to(target) if floating else value
        state[runtime] = value.to(_torch_device(where))
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():  # buffers built on the CPU keep their dtype; match the weights
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and name != "inv_freq":
                module._buffers[name] = buf.to(target)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and n not in on_disk]
    if still_meta:
        raise RuntimeError(f"parameters left uninitialised after loading: {still_meta[:5]}")
    model.checkpoint_layout = layout
    model.eval()
    if not device_map:
        return model.to(device)
    return _dispatch(model, device_map, offload_dir, index, main_device)


def _dispatch(model, device_map: dict, offload_dir, index: dict, main_device):
    """accelerate's hooks for `device_map`: each module runs on its device, modules on "cpu" (with a
    GPU as main device) or "disk" are offloaded and read from their store for each forward."""
    from accelerate import dispatch_model

    from mmprune.place.offload import bind_tied_weights, tied_weights
    from mmprune.place.plan import disjoint_map

    device_map = disjoint_map(model, device_map)
    devices = set(device_map.values())
    if len(devices) == 1 and "disk" not in devices:
        return model.to(_torch_device(devices.pop()))
    kwargs = {"main_device": main_device} if main_device is not None else {}  # an index or "cpu", as in the map
    ties = tied_weights(model)  # read before the hooks give each module its own meta tensor
    # an index (possibly empty) keeps accelerate from offloading the meta weights a second time
    model = dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir) if offload_dir else None,
                           offload_index=index if "disk" in devices else None, **kwargs)
    bind_tied_weights(model, ties)
    return model


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


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    check_tokenizer_files(model_dir)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # some versions warn that config.json's model_type is not a tokenizer's
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as exc:
        raise UserInputError(f"cannot load the tokenizer of {model_dir}: {one_line(exc, 200)}") from None
    finally:
        logging.set_verbosity(verbosity)


__all__ = ["CheckpointLayout", "load_model", "save_model", "read_weights", "open_weights", "load_tokenizer"]
