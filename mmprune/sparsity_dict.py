"""`sparsity_dict.yaml`: parameter name -> sparsity, written with every output and reusable
with `--sparsity_dict` to skip the allocation sweep."""

from __future__ import annotations

import os
import re
from typing import Mapping

import yaml

from mmprune.errors import UserInputError

_LAYER_SUFFIX = re.compile(r"(?:^|\.)(layers\.\d+\..+)$")


def write_sparsity_dict(path: str, sparsity: Mapping[str, float]) -> None:
    """Keys are weight parameter names (`...q_proj.weight`); values keep full float precision."""
    entries = {f"{name}.weight": float(value) for name, value in sparsity.items()}
    with open(path, "w") as handle:
        yaml.safe_dump(entries, handle, sort_keys=False)


def _layer_key(name: str) -> str:
    """`model.language_model.layers.3.mlp.up_proj` and `language_model.model.layers.3.mlp.up_proj`
    name the same linear under different transformers versions: compare from `layers.` on."""
    name = name[: -len(".weight")] if name.endswith(".weight") else name
    match = _LAYER_SUFFIX.search(name)
    return match.group(1) if match else name


def read_sparsity_dict(path: str, linear_names: list[str]) -> dict[str, float]:
    """Map a saved dict onto this model's linears; every linear must be covered, values in [0, 1)."""
    if not os.path.isfile(path):
        raise UserInputError(f"--sparsity_dict {path}: no such file; pass a sparsity_dict.yaml written by a run")
    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise UserInputError(f"--sparsity_dict {path} is not valid YAML ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserInputError(f"--sparsity_dict {path} must map parameter names to sparsity values")
    by_key = {_layer_key(str(k)): v for k, v in raw.items()}
    result: dict[str, float] = {}
    for name in linear_names:
        value = by_key.get(_layer_key(name))
        if value is None:
            raise UserInputError(
                f"--sparsity_dict {path} has no entry for {name}.weight; it was written for another "
                "model or layer count"
            )
        if not isinstance(value, (int, float)) or not 0 <= float(value) < 1:
            raise UserInputError(f"--sparsity_dict {path}: {name}.weight has sparsity {value!r}, outside [0, 1)")
        result[name] = float(value)
    return result
