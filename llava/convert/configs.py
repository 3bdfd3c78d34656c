"""Config side of the conversion: layout detection, llava-hf text/vision configs, llava tokens, chat template."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mmprune.run.checks import check_tokenizer_files
from mmprune.base.errors import UserInputError, one_line

# CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336), the tower of llama3-llava-next-8b
CLIP_VIT_L_14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}
CLIP_VISION_FIELDS = tuple(CLIP_VIT_L_14_336)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Llama fields taken from the source config into the text config
LLAMA_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pretraining_tp",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
)
LLAMA_MODEL_TYPES = ("llava_llama", "llava", "llama")
LLAMA_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaLlamaModel")

# Llama-3 chat template for llava-hf (docs/models.md 1.4): per message the role header, one
# <image> per image item followed by a newline, the trimmed text, <|eot_id|>. No BOS (the
# tokenizer adds <|begin_of_text|>) and no default system message.
LLAMA3_LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] | trim -}}"
    "{%- else -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list -%}"
    "{%- for item in images -%}{{- '<image>' -}}{%- endfor -%}"
    "{%- if images | length > 0 -%}{{- '\\n' -}}{%- endif -%}"
    "{{- message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | map('trim') | join('\\n') -}}"
    "{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)


# ---------------------------------------------------------------------------------------------
# detection


def _read_config(path: Path) -> dict | None:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def is_llava_hf_checkpoint(path) -> bool:
    """True when path holds a llava-hf LLaVA-NeXT directory (config.json model_type "llava_next")."""
    cfg = _read_config(Path(path))
    return cfg is not None and cfg.get("model_type") == "llava_next"


def is_lmms_lab_checkpoint(path) -> bool:
    """True when path holds a checkpoint in the original LLaVA(-NeXT) layout.

    Decided from config.json: the original code writes `mm_vision_tower` / `mm_projector_type`
    fields next to the LLM's fields; a llava-hf directory has model_type "llava_next" instead.
    """
    cfg = _read_config(Path(path))
    if cfg is None or cfg.get("model_type") == "llava_next":
        return False
    return "mm_vision_tower" in cfg or "mm_projector_type" in cfg


def _count_layers(shapes: dict, prefix: str) -> int:
    ids = set()
    for k in shapes:
        if k.startswith(prefix):
            ids.add(int(k[len(prefix) :].split(".", 1)[0]))
    return len(ids)


def _resolve_vision_config(src: Path, cfg: dict, shapes: dict):
    """CLIPVisionConfig from the source (vision_config entry or local mm_vision_tower) or ViT-L/14-336."""
    from transformers import CLIPVisionConfig

    fields, origin = None, None
    if isinstance(cfg.get("vision_config"), dict):
        fields, origin = cfg["vision_config"], f"the vision_config entry of {src / 'config.json'}"
    else:
        tower = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
        if isinstance(tower, str) and tower:
            for cand in (src / tower, Path(tower)):
                if (cand / "config.json").is_file():
                    try:
                        fields = json.loads((cand / "config.json").read_text(encoding="utf-8"))
                    except (OSError, ValueError) as exc:
                        raise UserInputError(f"cannot read {cand / 'config.json'}: {exc}; fix the file") from exc
                    origin = str(cand / "config.json")
                    break
    if fields is not None:
        if isinstance(fields.get("vision_config"), dict):  # a full CLIPConfig
            fields = fields["vision_config"]
        kwargs = {k: fields[k] for k in CLIP_VISION_FIELDS if k in fields}
    else:
        kwargs, origin = dict(CLIP_VIT_L_14_336), "the CLIP ViT-L/14-336 defaults"
    vision = CLIPVisionConfig(**kwargs)

    # the weights must agree with the config; heads cannot be checked from shapes
    pe = shapes["vision_tower.vision_model.embeddings.patch_embedding.weight"]
    pos = shapes["vision_tower.vision_model.embeddings.position_embedding.weight"]
    n_layers = _count_layers(shapes, "vision_tower.vision_model.encoder.layers.")
    fc1 = shapes.get("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight")
    found = {
        "hidden_size": pe[0],
        "patch_size": pe[-1],
        "image_size": int(round(math.sqrt(pos[0] - 1))) * pe[-1],
        "num_hidden_layers": n_layers,
        "intermediate_size": fc1[0] if fc1 else None,
    }
    bad = [f"{k} {getattr(vision, k)} vs {v} in the weights" for k, v in found.items() if getattr(vision, k) != v]
    if bad:
        raise UserInputError(
            f"the vision tower weights do not match {origin} ({'; '.join(bad)}); give the tower's "
            "config: add a vision_config entry to config.json or point mm_vision_tower to a local "
            "directory holding the CLIP config.json"
        )
    return vision


def _check_supported(src: Path, cfg: dict) -> None:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in LLAMA_MODEL_TYPES and not any(a in LLAMA_ARCHITECTURES for a in archs):
        raise UserInputError(
            f"{src} is a {model_type!r} LLaVA checkpoint; only Llama-based LLaVA-NeXT checkpoints "
            "(model_type 'llava_llama', e.g. lmms-lab/llama3-llava-next-8b) can be converted"
        )
    checks = [
        ("image_aspect_ratio", lambda v: v == "anyres", "anyres"),
        ("mm_patch_merge_type", lambda v: v == "spatial_unpad", "spatial_unpad"),
        ("mm_projector_type", lambda v: v == "mlp2x_gelu", "mlp2x_gelu"),
        ("mm_vision_select_feature", lambda v: v in (None, "patch", "cls_patch"), "patch or cls_patch"),
    ]
    for field, ok, expected in checks:
        value = cfg.get(field)
        if field == "mm_vision_select_feature" and value is None:
            continue
        if not ok(value):
            raise UserInputError(
                f"{src / 'config.json'} has {field}={value!r}; the llava-hf LLaVA-NeXT layout needs "
                f"{expected}: this checkpoint is not a LLaVA-NeXT (anyres) model and cannot be converted"
            )
    pins = cfg.get("image_grid_pinpoints")
    if (
        not isinstance(pins, list)
        or not pins
        or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, int) for x in p) for p in pins)
    ):
        raise UserInputError(
            f"{src / 'config.json'} has image_grid_pinpoints={pins!r}; expected a list of "
            "[width, height] integer pairs such as [[336, 672], [672, 336], [672, 672]]"
        )


def _text_config(cfg: dict, vocab_size: int, pad_token_id: int):
    from transformers import LlamaConfig

    kwargs = {k: cfg[k] for k in LLAMA_FIELDS if k in cfg and cfg[k] is not None}
    if isinstance(cfg.get("rope_parameters"), dict):
        rope = dict(cfg["rope_parameters"])
    else:
        rope = dict(cfg.get("rope_scaling") or {})
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope.setdefault("rope_type", "default")
        rope["rope_theta"] = float(cfg.get("rope_theta", 10000.0))
    return LlamaConfig(
        **kwargs,
        vocab_size=vocab_size,
        pad_token_id=pad_token_id,
        rope_parameters=rope,
        tie_word_embeddings=False,
    )


def _load_tokenizer(src: Path):
    # PreTrainedTokenizerFast reads tokenizer.json without AutoConfig, which would warn about the
    # unknown model_type "llava_llama"; sentencepiece-only checkpoints go through AutoTokenizer.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    check_tokenizer_files(src)
    loader = PreTrainedTokenizerFast if (src / "tokenizer.json").is_file() else AutoTokenizer
    try:
        return loader.from_pretrained(str(src))
    except Exception as exc:
        raise UserInputError(
            f"cannot load the tokenizer of {src} ({type(exc).__name__}: {one_line(exc)}); the directory needs the "
            "checkpoint's tokenizer.json and tokenizer_config.json"
        ) from None


def _add_llava_tokens(tokenizer) -> tuple[int, int]:
    """Add <image> and <pad> as special tokens (if missing); return their ids."""
    from transformers import AddedToken

    vocab = tokenizer.get_vocab()
    if "<image>" not in vocab:
        tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    if "<pad>" not in vocab:
        tokenizer.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    else:
        tokenizer.pad_token = "<pad>"
    return tokenizer.convert_tokens_to_ids("<image>"), tokenizer.convert_tokens_to_ids("<pad>")
