"""The configuration of a VideoLLaMA2(-AV) checkpoint, read from its `config.json` as released.

`config.json` is kept verbatim (and written back verbatim), and the parts are derived from it:

- the Qwen2 decoder: the top-level LLM fields (`hidden_size`, `num_hidden_layers`, ...);
- SigLIP: `mm_vision_tower` names it (`google/siglip-so400m-patch14-384`), whose configuration is
  not in the checkpoint folder: it is read from a local folder of that name when there is one,
  else from the known so400m values below; a `vision_config` object in config.json (the
  embedded tiny model) takes precedence;
- the STC connector: `mm_projector_type` (`stc_connector_v35`; `stc_connector` pads the sampler
  by 1); its depth is 4 in the released code, `stc_depth` overrides it (tiny model);
- BEATs: `mm_audio_tower` (a path that is never opened) means the default BEATs configuration;
  an `audio_config` object overrides fields (tiny model); the audio projector from
  `mm_projector_a_type`, `mm_hidden_size_a` -> `hidden_size_a`;
- media: `num_frames` (8 when absent, as the released code), frames squashed to SigLIP's
  image size; audio as 8 clips of 2 s padded to 30 s at 16 kHz (`audio_clips`,
  `audio_clip_seconds`, `audio_seconds` override these for the tiny model), clips spaced and
  fbank rounded as upstream (`audio_clip_spacing` "even" and `audio_fbank_dtype` "float32" give
  the rules the tiny embedded model was trained with).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

from transformers import Qwen2Config, SiglipVisionConfig

from mmprune.base.errors import UserInputError
from videollama2.beats import BEATsConfig

MODEL_TYPES = ("videollama2_qwen2",)
DEFAULT_NUM_FRAMES = 8  # the released code's NUM_FRAMES when config.json has no num_frames
AUDIO_SAMPLE_RATE = 16000

# google/siglip-so400m-patch14-384 (vision part of its config.json)
SIGLIP_SO400M_384 = {
    "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_channels": 3, "image_size": 384, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "attention_dropout": 0.0,
}
KNOWN_VISION_TOWERS = {"siglip-so400m-patch14-384": SIGLIP_SO400M_384}

_QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout", "max_window_layers",
)


class VideoLLaMA2Config:
    """config.json of a VideoLLaMA2-Qwen2 checkpoint plus the derived sub-configurations."""

    model_dir: str | None = None  # the folder it was read from

    def __init__(self, raw: dict, source: str = "<memory>"):
        self.raw = copy.deepcopy(raw)
        self.source = source
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise UserInputError(
                f"{source}: model_type is {model_type!r}, expected one of {', '.join(MODEL_TYPES)}; "
                "pass a VideoLLaMA2.1-AV checkpoint folder (e.g. DAMO-NLP-SG/VideoLLaMA2.1-7B-AV)")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if key not in raw:
                raise UserInputError(f"{source}: config.json lacks {key!r}; the checkpoint folder is incomplete")
        if not self.has_vision and not self.has_audio:
            raise UserInputError(f"{source}: config.json names neither mm_vision_tower nor mm_audio_tower")

    # ---------------------------------------------------------------------------- files

    @classmethod
    def from_dir(cls, model_dir) -> "VideoLLaMA2Config":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            state = "is a file, not a folder" if Path(model_dir).exists() else "does not exist"
            raise UserInputError(f"model folder {model_dir} {state}; pass a VideoLLaMA2.1-AV checkpoint folder "
                                 "to --model_path")
        if not path.is_file():
            raise UserInputError(f"model folder {model_dir} has no config.json; pass a VideoLLaMA2.1-AV "
                                 "checkpoint folder to --model_path")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserInputError(f"{path} is not valid JSON ({exc}); the checkpoint is damaged") from None
        if not isinstance(raw, dict):
            raise UserInputError(f"{path} does not hold a JSON object")
        config = cls(raw, str(path))
        config.model_dir = str(model_dir)
        return config

    def save(self, folder) -> None:
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(self.raw, handle, indent=2)
            handle.write("\n")

    # ---------------------------------------------------------------------------- language model

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.raw.get("tie_word_embeddings", False))

    def text_config(self) -> Qwen2Config:
        fields = {k: self.raw[k] for k in _QWEN2_FIELDS if self.raw.get(k) is not None}
        rope = self.raw.get("rope_parameters")
        if rope is None:
            if self.raw.get("rope_scaling"):
                raise UserInputError(f"{self.source}: rope_scaling {self.raw['rope_scaling']!r} is not supported")
            rope = {"rope_type": "default", "rope_theta": float(self.raw.get("rope_theta", 10000.0))}
        return Qwen2Config(**fields, rope_parameters=dict(rope), tie_word_embeddings=self.tie_word_embeddings,
                           use_sliding_window=False, sliding_window=None, attn_implementation="sdpa")

    # ---------------------------------------------------------------------------- vision

    @property
    def has_vision(self) -> bool:
        return bool(self.raw.get("mm_vision_tower") or self.raw.get("vision_config"))

    @property
    def vision_tower_name(self) -> str:
        return str(self.raw.get("mm_vision_tower") or "")

    def vision_config(self, use_head: bool = False) -> SiglipVisionConfig:
        values = self.raw.get("vision_config")
        if values is None:
            values = self._vision_config_from_tower_name()
        values = {k: v for k, v in values.items() if k not in ("model_type", "architectures", "transformers_version")}
        values["vision_use_head"] = use_head
        config = SiglipVisionConfig(**values, attn_implementation="sdpa")
        mm_hidden = self.raw.get("mm_hidden_size")
        if mm_hidden is not None and mm_hidden != config.hidden_size:
            raise UserInputError(f"{self.source}: mm_hidden_size {mm_hidden} does not match the vision tower "
                                 f"width {config.hidden_size}")
        return config

    def _vision_config_from_tower_name(self) -> dict:
        name = self.vision_tower_name
        if "siglip" not in name.lower():
            raise UserInputError(f"{self.source}: vision tower {name!r} is not supported; VideoLLaMA2.1 uses "
                                 "SigLIP (google/siglip-so400m-patch14-384)")
        local = Path(name) / "config.json"
        beside = Path(self.source).parent / Path(name).name / "config.json"
        if not local.is_file() and Path(name).is_absolute() and beside.is_file():
            local = beside  # a moved checkpoint with its own saved tower (videollama2/checkpoint/saving.py)
        if local.is_file():
            values = json.loads(local.read_text(encoding="utf-8"))
            return values.get("vision_config", values)
        for key, values in KNOWN_VISION_TOWERS.items():
            if name.rstrip("/").endswith(key):
                return dict(values)
        raise UserInputError(f"{self.source}: the configuration of vision tower {name!r} is unknown; put its "
                             "config.json in a local folder of that name")

    @property
    def select_layer(self) -> int:
        return int(self.raw.get("mm_vision_select_layer", -2))

    @property
    def num_frames(self) -> int:
        return int(self.raw.get("num_frames") or DEFAULT_NUM_FRAMES)

    @property
    def projector_type(self) -> str:
        return str(self.raw.get("mm_projector_type", "stc_connector_v35"))

    @property
    def stc_padding(self) -> int:
        kind = self.projector_type
        if kind not in ("stc_connector_v35", "stc_connector"):
            raise UserInputError(f"{self.source}: mm_projector_type {kind!r} is not supported; expected "
                                 "stc_connector_v35 (VideoLLaMA2.1) or stc_connector")
        return 0 if kind == "stc_connector_v35" else 1

    @property
    def stc_depth(self) -> int:
        return int(self.raw.get("stc_depth", 4))

    # ---------------------------------------------------------------------------- audio

    @property
    def has_audio(self) -> bool:
        return bool(self.raw.get("mm_audio_tower") or self.raw.get("audio_config"))

    def audio_config(self, predictor: bool = True) -> BEATsConfig:
        config = BEATsConfig.from_dict(self.raw.get("audio_config"))
        config.finetuned_model = predictor
        width = self.raw.get("mm_hidden_size_a")
        if width is not None and width != config.encoder_embed_dim:
            raise UserInputError(f"{self.source}: mm_hidden_size_a {width} does not match the BEATs width "
                                 f"{config.encoder_embed_dim}")
        return config

    @property
    def audio_projector_depth(self) -> int:
        """1 for `linear`, N for `mlpNx_gelu`."""
        kind = str(self.raw.get("mm_projector_a_type", "linear"))
        if kind == "linear":
            return 1
        match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
        if not match:
            raise UserInputError(f"{self.source}: mm_projector_a_type {kind!r} is not supported "
                                 "(linear or mlpNx_gelu)")
        return int(match.group(1))

    @property
    def audio_projector_width(self) -> int:
        return int(self.raw.get("hidden_size_a") or self.raw["hidden_size"])

    @property
    def audio_seconds(self) -> float:
        return float(self.raw.get("audio_seconds", 30.0))

    @property
    def audio_clips(self) -> int:
        return int(self.raw.get("audio_clips", 8))

    @property
    def audio_clip_seconds(self) -> float:
        return float(self.raw.get("audio_clip_seconds", 2.0))

    @property
    def audio_clip_spacing(self) -> str:
        """How clip starts are spread (videollama2/media.py); upstream's by default."""
        value = str(self.raw.get("audio_clip_spacing", "pytorchvideo"))
        if value not in ("pytorchvideo", "even"):
            raise UserInputError(f"{self.source}: audio_clip_spacing {value!r} is not 'pytorchvideo' or 'even'")
        return value

    @property
    def audio_fbank_dtype(self) -> str:
        """The dtype the fbank features are rounded to before the tower; upstream's bfloat16 by default."""
        value = str(self.raw.get("audio_fbank_dtype", "bfloat16"))
        if value not in ("bfloat16", "float32"):
            raise UserInputError(f"{self.source}: audio_fbank_dtype {value!r} is not 'bfloat16' or 'float32'")
        return value

    @property
    def audio_samples(self) -> int:
        return int(round(self.audio_seconds * AUDIO_SAMPLE_RATE))
