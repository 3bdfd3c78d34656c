"""LLaVA-NeXT side of EAS (mmprune/skip/eas.py): where the decoder layers are, and how a model with
skipped attention and PIA adapters is saved and loaded.

On disk an EAS model is an ordinary llava-hf checkpoint plus
* `config.json` field `"eas"`: {"format": 1, "skipped_layers": [...], "rank", "groups", "tau",
  "scale", "fuse", ...search metadata};
* the adapter weights in the same safetensors files, as `...layers.<i>.eas_pia.<name>`; skipped
  layers have no `self_attn` weights.
`load_model` (llava.eval) and `load_llava_next` (llava.convert, used by the pruners) call
`install_from_config` after `from_pretrained`, so every tool accepts such a directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from llava.model import decoder_layers
from mmprune.skip import eas
from mmprune.base.errors import UserInputError

CONFIG_KEY = "eas"
FORMAT = 1
_PIA_KEY = re.compile(r"layers\.(\d+)\.eas_pia\.(\w+)$")


def settings_of(model: nn.Module) -> dict | None:
    """The model's EAS settings (the config field), or None for a plain model."""
    value = getattr(model.config, CONFIG_KEY, None)
    return dict(value) if isinstance(value, dict) else None


def install(model: nn.Module, skipped, rank: int, groups: int = 2, tau: float = 10.0, scale: float = 1.0,
            dropout: float = 0.1, fuse: bool = False) -> eas.EASState:
    """Attach PIAs to `skipped` layers and remove their attention (weights start fresh)."""
    _, layers = decoder_layers(model)
    state = eas.attach(model, layers, sorted(skipped), rank, groups, tau, scale, dropout, fuse)
    eas.finalize(layers, skipped, state)
    return state


def _safetensors_files(model_path: Path) -> list[Path]:
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_path / name for name in names]
    return sorted(model_path.glob("*.safetensors"))


def load_adapter_weights(model: nn.Module, model_path) -> None:
    """Copy every `layers.<i>.eas_pia.*` tensor of the checkpoint into the installed adapters."""
    from safetensors import safe_open

    _, layers = decoder_layers(model)
    found: dict[int, dict] = {}
    for file in _safetensors_files(Path(model_path)):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                match = _PIA_KEY.search(key)
                if match:
                    found.setdefault(int(match.group(1)), {})[match.group(2)] = handle.get_tensor(key)
    expected = {i for i, layer in enumerate(layers) if hasattr(layer, "eas_pia")}
    if set(found) != expected:
        raise UserInputError(f"{model_path}: config.json says EAS skips layers {sorted(expected)} but the "
                             f"weights hold adapters for {sorted(found)}; the checkpoint is incomplete: "
                             "re-save it with scripts/eas/train.sh")
    for index, tensors in found.items():
        pia = layers[index].eas_pia
        try:
            pia.load_state_dict({k: v.to(pia.A_weight.dtype) for k, v in tensors.items()}, strict=True)
        except RuntimeError as exc:
            raise UserInputError(f"{model_path}: adapter weights of layer {index} do not match the config "
                                 f"({str(exc).splitlines()[0]}); re-save the model") from None


def install_from_config(model: nn.Module, model_path) -> nn.Module:
    """After `from_pretrained`: if the config carries EAS settings, skip those layers' attention
    and load their adapters. Plain checkpoints are returned unchanged."""
    cfg = settings_of(model)
    if cfg is None:
        return model
    if cfg.get("format") != FORMAT:
        raise UserInputError(f"{model_path}: EAS format {cfg.get('format')!r} is not supported (expected "
                             f"{FORMAT}); re-save the model with this version")
    device = next(model.parameters()).device
    install(model, cfg["skipped_layers"], cfg["rank"], cfg["groups"], cfg["tau"], cfg["scale"],
            fuse=cfg.get("fuse", False))
    load_adapter_weights(model, model_path)
    model.to(device)
    model.eval()
    return model


def write_settings(model: nn.Module, skipped, rank: int, groups: int, tau: float, scale: float,
                   fuse: bool = False, **metadata) -> dict:
    """Put the config field that `install_from_config` reads on the model's config."""
    cfg = {"format": FORMAT, "skipped_layers": sorted(int(i) for i in skipped), "rank": rank, "groups": groups,
           "tau": tau, "scale": scale, "fuse": fuse, **metadata}
    setattr(model.config, CONFIG_KEY, cfg)
    return cfg


def expected_load_gaps(model_path) -> tuple[list[str], list[str]]:
    """(missing, unexpected) key fragments that from_pretrained reports for an EAS checkpoint and
    that are no damage: the removed attention of skipped layers, and the adapters."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8")).get(CONFIG_KEY)
    except (OSError, ValueError, AttributeError):
        cfg = None
    if not isinstance(cfg, dict):
        return [], []
    skipped = cfg.get("skipped_layers") or []
    return [f"language_model.layers.{int(i)}.self_attn." for i in skipped], [".eas_pia."]
