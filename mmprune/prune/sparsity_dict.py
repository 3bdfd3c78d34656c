"""`sparsity_dict.yaml`: parameter name -> sparsity, written with every output and reusable
with `--sparsity_dict` to skip the allocation sweep."""

from __future__ import annotations

import os
import re
from typing import Mapping

import yaml

from mmprune.base.errors import UserInputError

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


def load_sparsity_dict(path: str) -> dict[str, float]:
    """Parse and check a sparsity_dict.yaml on its own (before any model is loaded): a non-empty
    mapping of parameter names to sparsity values in [0, 1)."""
    if not os.path.isfile(path):
        raise UserInputError(f"--sparsity_dict {path}: no such file; pass a sparsity_dict.yaml written by a run")
    try:
        with open(path) as handle:
            raw = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        reason = getattr(exc, "problem", None) or exc.__class__.__name__
        raise UserInputError(f"--sparsity_dict {path} is not valid YAML ({reason}{line}); pass a "
                             "sparsity_dict.yaml written by a run") from None
    except UnicodeDecodeError:
        raise UserInputError(f"--sparsity_dict {path} is not text; pass a sparsity_dict.yaml written by a run") from None
    if not isinstance(raw, dict) or not raw:
        raise UserInputError(f"--sparsity_dict {path} must map parameter names to sparsity values")
    result: dict[str, float] = {}
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) < 1:
            raise UserInputError(f"--sparsity_dict {path}: {key} has sparsity {value!r}, outside [0, 1)")
        result[str(key)] = float(value)
    return result


MEAN_TOLERANCE = 0.005  # a dict written for target T has a parameter-weighted mean of T (up to rounding)


def read_sparsity_dict(path: str, linear_names: list[str], sizes: dict[str, int] | None = None,
                       target: float | None = None) -> dict[str, float]:
    """Map a saved dict onto this model's linears: every linear covered, no entry for a layer the
    model lacks, and (given the linears' parameter counts and the target) a parameter-weighted
    mean within MEAN_TOLERANCE of the target, which the report would otherwise misstate."""
    by_key = {_layer_key(k): v for k, v in load_sparsity_dict(path).items()}
    wanted = {_layer_key(name): name for name in linear_names}
    result: dict[str, float] = {}
    for key, name in wanted.items():
        if key not in by_key:
            raise UserInputError(
                f"--sparsity_dict {path} has no entry for {name}.weight; it was written for another "
                "model or layer count"
            )
        result[name] = by_key[key]
    extra = [key for key in by_key if key not in wanted]
    if extra:
        raise UserInputError(
            f"--sparsity_dict {path} names {len(extra)} layers this model lacks ({', '.join(extra[:3])}"
            f"{', ...' if len(extra) > 3 else ''}); it was written for another model or layer count"
        )
    if sizes is not None and target is not None:
        total = sum(sizes[name] for name in result)
        mean = sum(sizes[name] * value for name, value in result.items()) / total
        if abs(mean - target) > MEAN_TOLERANCE:
            raise UserInputError(
                f"--sparsity_dict {path} prunes {mean:.4g} of the decoder weights (parameter-weighted mean), "
                f"but the target sparsity is {target:g}; pass --llm_sparsity_ratio {mean:.4g} or a dict written "
                "for this target"
            )
    return result
