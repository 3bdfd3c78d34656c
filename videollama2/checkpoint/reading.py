"""The checkpoint's weight files, read lazily, and the layout that saving reproduces."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mmprune.run.checks import weight_files
from mmprune.base.errors import UserInputError
from videollama2.checkpoint.keys import AUDIO_PREFIX, AUDIO_TOWER_BIN, BIN_INDEX, SAFE_INDEX, VISION_CHECKPOINT


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
