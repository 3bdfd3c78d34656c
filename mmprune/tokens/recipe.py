"""Token recipes: the fraction of a prompt's visual tokens kept after each decoder layer, checked on
construction, and their JSON files (written atomically; a hand-written {"keep_fraction": [...]} loads too)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from mmprune.base.errors import UserInputError

RECIPE_FORMAT = "mmprune-fitprune-recipe"
RECIPE_VERSION = 1


@dataclass
class TokenRecipe:
    """keep_fraction[l]: fraction of the prompt's visual tokens still present after layer l.

    Non-increasing, in [0, 1]; applies to any image size: a prompt with N visual tokens keeps
    max(1, round(keep_fraction[l] * N)) of them after layer l.
    """

    keep_fraction: list[float]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        check_keep_fractions(self.keep_fraction)
        self.keep_fraction = [float(f) for f in self.keep_fraction]

    @property
    def num_layers(self) -> int:
        return len(self.keep_fraction)

    def kept_after(self, n_visual: int) -> list[int]:
        """Visual tokens left after each layer for a prompt with n_visual of them (at least 1)."""
        kept, current = [], n_visual
        for fraction in self.keep_fraction:
            current = min(current, max(1, int(round(fraction * n_visual))))
            kept.append(current)
        return kept

    def drops(self, n_visual: int) -> list[int]:
        counts = [n_visual] + self.kept_after(n_visual)
        return [counts[l] - counts[l + 1] for l in range(self.num_layers)]

    @classmethod
    def dense(cls, num_layers: int) -> "TokenRecipe":
        return cls([1.0] * num_layers, {"note": "keeps every token"})

    def to_json(self) -> dict:
        return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "num_layers": self.num_layers,
                "keep_fraction": [round(f, 8) for f in self.keep_fraction], **self.meta}


def check_keep_fractions(fractions) -> None:
    if not isinstance(fractions, (list, tuple)) or not fractions:
        raise UserInputError(f"keep_fraction must be a non-empty list (one value per decoder layer), "
                             f"got {fractions!r}")
    for layer, value in enumerate(fractions):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0.0 <= value <= 1.0:
            raise UserInputError(f"keep_fraction[{layer}] = {value!r} is outside [0, 1]; each entry is the "
                                 "fraction of visual tokens kept after that layer")
    for layer in range(1, len(fractions)):
        if fractions[layer] > fractions[layer - 1] + 1e-9:
            raise UserInputError(f"keep_fraction rises from {fractions[layer - 1]} (layer {layer - 1}) to "
                                 f"{fractions[layer]} (layer {layer}); dropped tokens cannot come back, "
                                 "so the fractions must be non-increasing")


def load_recipe(path) -> TokenRecipe:
    """A recipe JSON written by save_recipe (or by hand: {"keep_fraction": [...]})."""
    if not os.path.isfile(path):
        raise UserInputError(f"token recipe {path} does not exist; create one with "
                             "scripts/fitprune/search.sh")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"token recipe {path} is not valid JSON ({exc}); regenerate it") from None
    if not isinstance(data, dict) or "keep_fraction" not in data:
        raise UserInputError(f"token recipe {path} has no 'keep_fraction' list; regenerate it with "
                             "scripts/fitprune/search.sh")
    fractions = data["keep_fraction"]
    if isinstance(fractions, list) and data.get("num_layers", len(fractions)) != len(fractions):
        raise UserInputError(f"token recipe {path} says num_layers {data['num_layers']} but lists "
                             f"{len(data['keep_fraction'])} fractions; regenerate it")
    meta = {k: v for k, v in data.items() if k not in ("format", "version", "num_layers", "keep_fraction")}
    return TokenRecipe(data["keep_fraction"], meta)


def save_recipe(path, recipe: TokenRecipe) -> None:
    """Write atomically (a hidden temporary file renamed into place, removed on error or signal)."""
    from mmprune.base.output import write_json_file

    write_json_file(str(path), recipe.to_json())


def is_recipe_file(path) -> bool:
    """Whether `path` holds a recipe this project wrote (its "format" key): what --overwrite may replace."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == RECIPE_FORMAT and "keep_fraction" in data
