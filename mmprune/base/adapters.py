"""The model-family registry: each family (LLaVA-NeXT, VideoLLaMA2, ...) provides one `ModelAdapter`,
found by the `model_type` of a checkpoint's config.json. The core asks the registry; it never imports a
model tree. Families register through the `mmprune.adapters` entry-point group (pyproject.toml), or by
calling `register` (tests, plugins loaded by hand)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from mmprune.base.errors import UserInputError

ENTRY_POINT_GROUP = "mmprune.adapters"


@dataclass(frozen=True)
class ModelAdapter:
    """What the core needs to know of one model family; the algorithms never see more than this."""

    model_type: str                                           # config.json's model_type
    family: str                                               # name shown in reports and errors
    modality_names: Mapping[int, str]                         # per-token modality id -> name
    load: Callable[..., tuple[nn.Module, Any]]                # (path, dtype, device_map, offload_folder) -> (model, processor)
    decoder_blocks: Callable[[nn.Module], tuple[str, nn.ModuleList]]  # -> (runtime name, decoder layers)
    capture: Callable[..., Any]                               # (model, samples, device, store_device, total) -> CalibrationStore
    empty_model: Callable[[Path], nn.Module]                  # the model from config alone, built on the meta device
    save: Callable[..., None]                                 # (model, processor, folder, max_shard_size=None)


_ADAPTERS: dict[str, ModelAdapter] = {}
_LOADED_ENTRY_POINTS = False


def register(adapter: ModelAdapter) -> ModelAdapter:
    """Make `adapter` the one for its model_type (a later registration replaces an earlier one)."""
    _ADAPTERS[adapter.model_type] = adapter
    return adapter


def _load_entry_points() -> None:
    global _LOADED_ENTRY_POINTS
    if _LOADED_ENTRY_POINTS:
        return
    _LOADED_ENTRY_POINTS = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name not in _ADAPTERS:
            register(point.load())


def registered_types() -> list[str]:
    _load_entry_points()
    return sorted(_ADAPTERS)


def adapter_for(model_type: str | None) -> ModelAdapter:
    if model_type not in _ADAPTERS:
        _load_entry_points()
    if model_type not in _ADAPTERS:
        known = ", ".join(registered_types()) or "none (install the package: pip install -e .)"
        raise UserInputError(f"no model family handles model_type {model_type!r}; known: {known}")
    return _ADAPTERS[model_type]


def checkpoint_model_type(model_path) -> str | None:
    """config.json's model_type of a checkpoint folder (UserInputError when it has no readable config.json)."""
    path = Path(model_path) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise UserInputError(f"{model_path} has no config.json; pass a checkpoint folder to --model_path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise UserInputError(f"{path} is not a readable JSON config ({exc}); pass a checkpoint folder") from None


def adapter_for_checkpoint(model_path) -> ModelAdapter:
    return adapter_for(checkpoint_model_type(model_path))
