"""Names in the released layout: weight and index files, and runtime <-> checkpoint key names."""

from __future__ import annotations

import re

VISION_RUNTIME = "model.vision_tower.vision_tower."
VISION_CHECKPOINT = "model.vision_tower.vision_tower.vision_model."
AUDIO_PREFIX = "model.audio_tower."
AUDIO_TOWER_BIN = "audio_tower.bin"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_REL_BIAS = re.compile(r"^model\.audio_tower\.encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.weight$")
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")
REL_BIAS_TABLE = "model.audio_tower.encoder.layers.0.self_attn.relative_attention_bias.weight"


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
