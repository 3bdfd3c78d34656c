"""Convert an original lmms-lab LLaVA-NeXT checkpoint to the llava-hf layout, and load either.

The TAMP paper prunes `lmms-lab/llama3-llava-next-8b`, saved by the original LLaVA-NeXT code:
a Llama config with `mm_*` fields (model_type "llava_llama"), keys `model.layers.*`,
`model.mm_projector.{0,2}.*`, `model.vision_tower.vision_tower.vision_model.*`,
`model.image_newline`, `lm_head.weight`, a 128256-token Llama-3-Instruct tokenizer and anyres
pinpoints written as (width, height). The pruner works on `LlavaNextForConditionalGeneration`
(llava-hf layout), so this module writes such a directory:

* config: `LlavaNextConfig` with the Llama fields of the source as text config; the CLIP
  ViT-L/14-336 numbers as vision config unless the source carries one (a `vision_config` entry in
  config.json, or `mm_vision_tower` naming a local directory with a config.json); pinpoints turned
  to (height, width); `vision_feature_layer` = `mm_vision_select_layer`;
* weights: renamed to the llava-hf on-disk names (docs/models.md 1.9), streamed shard by shard
  into sharded safetensors, optionally cast;
* tokenizer: `<image>` and `<pad>` added as special tokens; embeddings and lm_head grown to a
  multiple of 64 rows. The new rows are the **mean of the existing rows** (deterministic). The
  transformers converter script (`convert_llava_next_weights_to_hf.py`) instead samples them from
  a normal distribution around that mean, so those rows differ from llava-hf's release; they are
  never used for text (the `<image>` rows are replaced by image features before the decoder);
* processor: `LlavaNextProcessor` (patch size from the vision config, strategy "default",
  `num_additional_image_tokens=1`), the PIL LLaVA-NeXT image processor with CLIP-336
  preprocessing, and a Llama-3 chat template for llava-hf as the processor chat template.

CLI: ``python -m llava.convert --src DIR --dst DIR [--dtype bfloat16]``.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from mmprune.run.checks import check_tokenizer_files
from mmprune.base.errors import UserInputError, one_line
from mmprune.base.interrupt import signals_deferred
from mmprune.base.output import check_output_location, share_tree

CONVERTER_COMMAND = "python -m llava.convert --src LMMS_LAB_DIR --dst LLAVA_HF_DIR"
PROVENANCE_FILE = "mmprune_conversion.json"
VOCAB_MULTIPLE = 64
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

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

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


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


# ---------------------------------------------------------------------------------------------
# helpers


def parse_dtype(dtype) -> torch.dtype | None:
    """None, a torch floating dtype, or a name such as "bfloat16" -> torch dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise UserInputError(f"dtype {dtype} is not a floating dtype; use float32, float16 or bfloat16")
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name in _DTYPES:
            return _DTYPES[name]
    raise UserInputError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weight_files(src: Path) -> list[Path]:
    """The checkpoint's weight files, in index order (safetensors preferred over .bin)."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = src / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserInputError(f"cannot read the weight index {index}: {exc}; restore the file") from exc
            files = []
            for name in dict.fromkeys(weight_map.values()):
                f = src / name
                if not f.is_file():
                    raise UserInputError(
                        f"{index} names the shard {name}, which is missing from {src}; "
                        "download the complete checkpoint"
                    )
                files.append(f)
            return files
        if (src / single_name).is_file():
            return [src / single_name]
    raise UserInputError(
        f"no weights in {src}: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json); "
        "download the complete checkpoint"
    )


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class _TensorSource:
    """Reads tensors from one weight file lazily (safetensors) or via an mmap'ed torch.load."""

    def __init__(self, path: Path):
        self.path = path
        self._st = None
        self._sd = None
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._st = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # corrupt or truncated file
                raise UserInputError(f"cannot read {path}: {exc}; re-download the shard") from exc
        else:
            try:
                self._sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise UserInputError(f"cannot read {path}: {exc}; re-download the shard") from exc

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._sd.keys())

    def get(self, key: str) -> torch.Tensor:
        return self._st.get_tensor(key) if self._st is not None else self._sd[key]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype | None:
        if self._st is not None:
            return _SAFETENSORS_DTYPES.get(self._st.get_slice(key).get_dtype())
        return self._sd[key].dtype


def _map_key(key: str) -> str | None:
    """Original LLaVA-NeXT key -> llava-hf on-disk key; None for buffers that are dropped.

    Raises KeyError for keys this converter does not know.
    """
    if key.endswith(".position_ids") or key.endswith("rotary_emb.inv_freq"):
        return None  # non-persistent buffers in current transformers
    if key.startswith("model.vision_tower.vision_tower."):
        rest = key[len("model.vision_tower.vision_tower.") :]
        if rest.startswith("vision_model."):
            return "vision_tower." + rest
        raise KeyError(key)
    if key.startswith("model.mm_projector.0."):
        return "multi_modal_projector.linear_1." + key[len("model.mm_projector.0.") :]
    if key.startswith("model.mm_projector.2."):
        return "multi_modal_projector.linear_2." + key[len("model.mm_projector.2.") :]
    if key == "model.image_newline":
        return "image_newline"
    if key == "model.embed_tokens.weight" or key == "model.norm.weight" or key.startswith("model.layers."):
        return "language_model." + key
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    raise KeyError(key)


EMBED_KEY = "language_model.model.embed_tokens.weight"
LM_HEAD_KEY = "language_model.lm_head.weight"
REQUIRED_KEYS = (
    EMBED_KEY,
    LM_HEAD_KEY,
    "language_model.model.norm.weight",
    "image_newline",
    "multi_modal_projector.linear_1.weight",
    "multi_modal_projector.linear_2.weight",
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.embeddings.position_embedding.weight",
)


def _plan_weights(src: Path) -> tuple[list[tuple[_TensorSource, list[tuple[str, str]]]], dict[str, tuple]]:
    """Per source file, the (source key, destination key) pairs; plus every destination shape."""
    plan, shapes, unknown = [], {}, []
    for f in _weight_files(src):
        reader = _TensorSource(f)
        pairs = []
        for key in reader.keys():
            try:
                new = _map_key(key)
            except KeyError:
                unknown.append(key)
                continue
            if new is None:
                continue
            if new in shapes:
                raise UserInputError(f"the key {key} appears twice in {src}; the checkpoint is inconsistent")
            shapes[new] = reader.shape(key)
            pairs.append((key, new))
        plan.append((reader, pairs))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise UserInputError(
            f"{src} holds weights this converter does not know: {shown}; only the Llama-based "
            "LLaVA-NeXT layout (model.layers, model.mm_projector.0/2, model.vision_tower.vision_tower, "
            "model.image_newline, lm_head) is supported"
        )
    missing = [k for k in REQUIRED_KEYS if k not in shapes]
    if missing:
        raise UserInputError(
            f"{src} lacks the weights {', '.join(missing)} (llava-hf names); download the complete "
            "lmms-lab checkpoint (its vision tower must be saved in it)"
        )
    return plan, shapes


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


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Append rows equal to the mean of the existing rows (computed in float32)."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)


class _ShardWriter:
    """Collects tensors and writes safetensors shards of at most max_bytes (one tensor may exceed)."""

    def __init__(self, out_dir: Path, max_bytes: int):
        from safetensors.torch import save_file

        self._save = save_file
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.buffer, self.buffer_bytes = {}, 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()
        self.buffer[key] = tensor.contiguous()
        self.buffer_bytes += size
        self.total += size

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.out_dir / f".part-{len(self.parts):05d}.safetensors"
        self._save(self.buffer, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.parts)
        if n == 1:
            self.parts[0][0].rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, (path, keys) in enumerate(self.parts):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.out_dir / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _source_fingerprint(src: Path) -> list[list]:
    """Names, sizes and mtimes of the source's top-level files (to recognise a cached conversion)."""
    out = []
    for f in sorted(src.iterdir()):
        if f.is_file():
            st = f.stat()
            out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# conversion


def convert_lmms_lab_to_hf(src_dir, dst_dir, dtype=None, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a llava-hf copy of the lmms-lab LLaVA-NeXT checkpoint in src_dir to dst_dir.

    dtype: None keeps the stored dtypes; "bfloat16"/"float16"/"float32" (or a torch dtype) casts
    every floating tensor. dst_dir must not exist; it is written in a temporary directory beside
    it and renamed at the end. src_dir is only read. Returns the destination path.
    """
    src, dst = Path(src_dir).expanduser().resolve(), Path(dst_dir).expanduser().absolute()
    cast = parse_dtype(dtype)
    if not src.is_dir():
        raise UserInputError(
            f"source {src} is not a directory; pass the lmms-lab checkpoint directory (config.json, "
            "tokenizer and weights), e.g. a local copy of lmms-lab/llama3-llava-next-8b"
        )
    cfg = _read_config(src)
    if cfg is None:
        raise UserInputError(f"{src} has no readable config.json; pass an lmms-lab LLaVA-NeXT checkpoint directory")
    if cfg.get("model_type") == "llava_next":
        raise UserInputError(f"{src} is already in the llava-hf layout; load it directly, no conversion needed")
    if not is_lmms_lab_checkpoint(src):
        raise UserInputError(
            f"{src / 'config.json'} has no mm_vision_tower/mm_projector_type fields; it is not an "
            "lmms-lab (original LLaVA-NeXT) checkpoint"
        )
    if dst.exists() or dst.is_symlink():
        raise UserInputError(f"destination {dst} already exists; choose a new --dst or delete it first")
    if _is_within(dst.resolve(), src):
        raise UserInputError(f"destination {dst} lies inside the source {src}; choose a directory outside it")
    check_output_location(str(dst), [str(src)], "--dst")  # e.g. a regular file on the way to dst
    _check_supported(src, cfg)

    from transformers import GenerationConfig, LlavaNextConfig, LlavaNextProcessor
    from transformers import __version__ as tf_version
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    plan, shapes = _plan_weights(src)
    vision_config = _resolve_vision_config(src, cfg, shapes)
    emb_rows, hidden = shapes[EMBED_KEY]
    if shapes[LM_HEAD_KEY] != (emb_rows, hidden):
        raise UserInputError(
            f"lm_head {shapes[LM_HEAD_KEY]} and embed_tokens {(emb_rows, hidden)} of {src} differ in shape; "
            "the checkpoint is inconsistent"
        )
    if cfg.get("hidden_size", hidden) != hidden:
        raise UserInputError(
            f"{src / 'config.json'} says hidden_size {cfg['hidden_size']} but the weights have {hidden}; "
            "the checkpoint is inconsistent"
        )
    proj1 = shapes["multi_modal_projector.linear_1.weight"]
    if proj1 != (hidden, vision_config.hidden_size):
        raise UserInputError(
            f"the projector's first layer is {proj1}, expected ({hidden}, {vision_config.hidden_size}) from the "
            "LLM width and the vision tower width; the checkpoint is inconsistent"
        )
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and mm_hidden != vision_config.hidden_size:
        raise UserInputError(
            f"{src / 'config.json'} has mm_hidden_size {mm_hidden} but the vision tower is "
            f"{vision_config.hidden_size} wide"
        )

    tokenizer = _load_tokenizer(src)
    n_src_tokens = len(tokenizer)
    image_id, pad_id = _add_llava_tokens(tokenizer)
    n_tokens = len(tokenizer)
    vocab_rows = max(emb_rows, -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)

    stored = next((reader.dtype(k) for reader, pairs in plan for k, new in pairs if new == EMBED_KEY), None)
    out_dtype = cast or stored or torch.float32
    if "<|start_header_id|>" in tokenizer.get_vocab():
        chat_template = LLAMA3_LLAVA_CHAT_TEMPLATE
    else:
        chat_template = None
        print(
            f"mmprune: the tokenizer of {src} is not a Llama-3 tokenizer; the converted processor gets no "
            "chat template (build prompts yourself)",
            file=sys.stderr,
        )

    text_config = _text_config(cfg, vocab_rows, pad_id)
    text_config.dtype = out_dtype
    vision_config.dtype = out_dtype
    pins_hw = [[int(h), int(w)] for w, h in cfg["image_grid_pinpoints"]]
    strategy = "full" if cfg.get("mm_vision_select_feature") == "cls_patch" else "default"
    grid = vision_config.image_size // vision_config.patch_size
    config = LlavaNextConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_id,
        image_grid_pinpoints=pins_hw,
        vision_feature_layer=int(cfg.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias="multi_modal_projector.linear_1.bias" in shapes,
        image_seq_length=grid * grid,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]
    config.dtype = out_dtype

    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dst.name}-", dir=dst.parent))
    except OSError as exc:
        raise UserInputError(f"cannot write into {dst.parent} ({exc}); choose a writable --dst") from exc
    try:
        writer = _ShardWriter(tmp, max_shard_bytes)
        for reader, pairs in plan:
            for key, new in pairs:
                tensor = reader.get(key)
                if cast is not None and tensor.is_floating_point():
                    tensor = tensor.to(cast)
                if new in (EMBED_KEY, LM_HEAD_KEY):
                    tensor = _grow_rows(tensor, vocab_rows)
                writer.add(new, tensor)
        writer.finish()
        del plan

        config.save_pretrained(tmp)
        if (src / "generation_config.json").is_file():
            gen = GenerationConfig.from_pretrained(str(src))
        else:
            gen = GenerationConfig(bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id)
        gen.pad_token_id = pad_id
        gen.save_pretrained(tmp)

        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": vision_config.image_size},
            crop_size={"height": vision_config.image_size, "width": vision_config.image_size},
            image_grid_pinpoints=pins_hw,
            image_mean=CLIP_MEAN,
            image_std=CLIP_STD,
            do_pad=True,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=vision_config.patch_size,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=1,
            chat_template=chat_template,
            image_token="<image>",
        )
        processor.save_pretrained(tmp)

        provenance = {
            "converted_by": "llava.convert (mmprune)",
            "source": str(src),
            "source_fingerprint": _source_fingerprint(src),
            "transformers_version": tf_version,
            "dtype": _dtype_name(out_dtype),
            "added_tokens": {"<image>": image_id, "<pad>": pad_id},
            "source_tokenizer_size": n_src_tokens,
            "vocab_rows": {"source": emb_rows, "converted": vocab_rows},
            "new_rows_init": "mean of the existing rows (deterministic); the transformers converter "
            "samples around that mean instead",
            "image_grid_pinpoints_source_wh": cfg["image_grid_pinpoints"],
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        share_tree(str(tmp))  # safetensors writes 0600 files
        try:
            with signals_deferred():
                os.rename(tmp, dst)
        except OSError as exc:
            raise UserInputError(f"cannot move the converted model to {dst} ({exc}); choose a new --dst") from exc
    except BaseException:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


# ---------------------------------------------------------------------------------------------
# loading


def _reuse_cached(src: Path, dst: Path) -> Path:
    try:
        prov = json.loads((dst / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        prov = None
    if (
        isinstance(prov, dict)
        and prov.get("source") == str(src)
        and prov.get("source_fingerprint") == _source_fingerprint(src)
    ):
        print(f"mmprune: using the llava-hf conversion of {src} cached in {dst}", file=sys.stderr)
        return dst
    raise UserInputError(f"{dst} exists but is not a conversion of the current {src}; delete it to convert again")


def _convert_on_load(src: Path, convert_cache_dir) -> Path:
    src = src.resolve()
    if convert_cache_dir is not None:
        cache = Path(convert_cache_dir).expanduser().absolute()
        tag = hashlib.sha1(str(src).encode()).hexdigest()[:10]
        dst = cache / f"{src.name}-llava-hf-{tag}"
        if dst.exists():
            return _reuse_cached(src, dst)
        print(
            f"mmprune: {src} is an lmms-lab (original LLaVA-NeXT) checkpoint; converting it to the "
            f"llava-hf layout in {dst} (kept for later loads)",
            file=sys.stderr,
        )
        try:
            return convert_lmms_lab_to_hf(src, dst)
        except UserInputError:
            if dst.exists():  # another process finished the same conversion first
                return _reuse_cached(src, dst)
            raise
    tmp_root = Path(tempfile.mkdtemp(prefix="mmprune-llava-hf-"))
    atexit.register(shutil.rmtree, tmp_root, ignore_errors=True)
    dst = tmp_root / src.name
    print(
        f"mmprune: {src} is an lmms-lab (original LLaVA-NeXT) checkpoint; converting it to the llava-hf "
        f"layout in the temporary directory {dst} (removed at exit; keep a copy with `{CONVERTER_COMMAND}` "
        "or pass convert_cache_dir)",
        file=sys.stderr,
    )
    try:
        return convert_lmms_lab_to_hf(src, dst)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise


def load_pretrained_checked(model_class, hf_dir, **kwargs):
    """from_pretrained with the weight files checked first (an index naming a missing shard, a
    truncated file) and every parameter required to come from them: transformers would otherwise
    start missing ones from random values and go on with a long load report. The report is
    muted: check_loaded_weights says what matters in one line. A checkpoint saved with
    --save_format compressed is read through its dense copy (mmprune.base.sparse_format), since
    transformers 5.x cannot load compressed-tensors' sparse formats."""
    from transformers.utils import logging as hf_logging

    from llava import eas
    from mmprune.base.sparse_format import dense_checkpoint
    from mmprune.run.checks import check_loaded_weights, weight_files

    weight_files(hf_dir)
    hf_dir = dense_checkpoint(hf_dir)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # mismatched shapes come back in `info` (named below) rather than as an error pointing to the muted report
        model, info = model_class.from_pretrained(str(hf_dir), output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
        raise UserInputError(f"cannot load the model weights from {hf_dir} ({first}); restore the checkpoint") from None
    finally:
        hf_logging.set_verbosity(previous)
    check_loaded_weights(info, hf_dir, *eas.expected_load_gaps(hf_dir))
    return model


def check_processor_files(hf_dir) -> None:
    """A llava-hf folder's processor files, named in one line when missing: the tokenizer's and
    the image processor's (preprocessor_config.json, or processor_config.json holding it)."""
    hf_dir = Path(hf_dir)
    image_processor = (hf_dir / "preprocessor_config.json").is_file()
    if not image_processor and (hf_dir / "processor_config.json").is_file():
        try:
            image_processor = "image_processor" in json.loads((hf_dir / "processor_config.json").read_text("utf-8"))
        except (OSError, ValueError, TypeError):
            raise UserInputError(f"{hf_dir / 'processor_config.json'} is not valid JSON; restore it from the "
                                 "checkpoint") from None
    check_tokenizer_files(hf_dir, () if image_processor else
                          ["preprocessor_config.json (or a processor_config.json holding the image processor)"])


def load_processor(hf_dir):
    """The LlavaNextProcessor of a llava-hf folder, its files checked first."""
    from transformers import AutoProcessor

    check_processor_files(hf_dir)
    try:
        return AutoProcessor.from_pretrained(str(hf_dir))
    except (OSError, ValueError, TypeError) as exc:
        raise UserInputError(f"cannot load the processor of {hf_dir} ({one_line(exc)}); restore the checkpoint's "
                             "tokenizer and processor files") from None


def load_llava_next(model_path, dtype="auto", device_map=None, attn_implementation="sdpa", convert_cache_dir=None,
                    offload_folder=None):
    """Load a LLaVA-NeXT model and its processor: returns (model, processor), model in eval mode.
    With `device_map` accelerate places it (modules on "disk" are read from `offload_folder`).

    model_path: a llava-hf directory (loaded as is) or an lmms-lab checkpoint (converted first,
    into convert_cache_dir when given -- reused on later calls -- else into a temporary directory).
    dtype: "auto" (the stored dtype), a torch dtype or its name.
    """
    from transformers import LlavaNextForConditionalGeneration

    path = Path(model_path).expanduser()
    expected = (
        "expected a llava-hf LLaVA-NeXT directory (config.json with model_type 'llava_next') or an "
        f"lmms-lab LLaVA-NeXT checkpoint (config.json with mm_* fields; convert it with `{CONVERTER_COMMAND}`)"
    )
    if not path.exists():
        raise UserInputError(f"model path {path} does not exist; {expected}")
    if not path.is_dir():
        raise UserInputError(f"model path {path} is not a directory; {expected}")
    load_dtype = dtype if (isinstance(dtype, str) and dtype == "auto") else parse_dtype(dtype)

    if is_llava_hf_checkpoint(path):
        hf_dir = path
    elif is_lmms_lab_checkpoint(path):
        hf_dir = _convert_on_load(path, convert_cache_dir)
    else:
        cfg = _read_config(path)
        what = "has no readable config.json" if cfg is None else f"has model_type {cfg.get('model_type')!r}"
        raise UserInputError(f"model path {path} {what}; {expected}")

    processor = load_processor(hf_dir)  # a missing processor file stops the run before the weights load
    kwargs = {"dtype": load_dtype, "attn_implementation": attn_implementation}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    from llava import eas

    with warnings.catch_warnings():
        # a placement names parameters such as model.image_newline; accelerate says they are not modules
        warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
        model = load_pretrained_checked(LlavaNextForConditionalGeneration, hf_dir, **kwargs)
    if device_map is not None:
        from mmprune.place.offload import bind_tied_weights

        bind_tied_weights(model)  # an offloaded tied head reads the embedding's entry
    eas.install_from_config(model, hf_dir)  # skipped attention + adapters of an EAS model
    model.eval()
    return model, processor


def load_model(model_path, device: str | None = None):
    """(model, processor) from a llava-hf style directory; float32 on CPU, bfloat16 on GPU."""
    from transformers import LlavaNextForConditionalGeneration

    from llava import eas
    from mmprune.run.checks import resolve_device

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise UserInputError(f"model directory {model_path} has no config.json; pass a llava-hf "
                             "LLaVA-NeXT checkpoint directory to --model_path")
    device = resolve_device(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    processor = load_processor(model_path)
    model = load_pretrained_checked(LlavaNextForConditionalGeneration, model_path, dtype=dtype)
    eas.install_from_config(model, model_path)  # skipped attention + adapters of an EAS model
    return model.to(device), processor


# ---------------------------------------------------------------------------------------------
# CLI


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like the other entry points
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    parser = _OneLineParser(
        prog="python -m llava.convert",
        description="Convert an lmms-lab LLaVA-NeXT checkpoint (original layout) to the llava-hf layout.",
    )
    parser.add_argument("--src", required=True, help="lmms-lab checkpoint directory (read only)")
    parser.add_argument("--dst", required=True, help="new llava-hf directory (must not exist)")
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="cast weights (default: keep)"
    )
    args = parser.parse_args(argv)

    def convert(_argv) -> int:
        print(f"wrote {convert_lmms_lab_to_hf(args.src, args.dst, dtype=args.dtype)}")
        return 0

    from mmprune.base.entry import run_main

    return run_main(convert)


if __name__ == "__main__":
    sys.exit(main())
