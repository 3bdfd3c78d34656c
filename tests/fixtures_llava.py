"""Tiny offline LLaVA-NeXT fixtures (docs/models.md section 3), shared by the tests.

`build_tiny_llava_next(tmp_dir)` writes a random-weight llava-hf model and processor that
exercise the same code paths as llava-hf/llama3-llava-next-8b-hf (CLIP tower, anyres tiles,
2-layer projector with GELU, image newline, Llama decoder, Llama-3 style chat template);
`build_tiny_lmms_lab(hf_dir, out_dir)` writes the same weights in the original
lmms-lab/LLaVA-NeXT layout (the inverse of `llava.convert`), `make_test_image(h, w)` gives a
deterministic RGB picture and `write_image_data` a calibration folder of such pictures. Nothing is
downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import AddedToken as RawAddedToken
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AddedToken,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava.convert import LLAMA3_LLAVA_CHAT_TEMPLATE

TINY_IMAGE_SIZE = 28
TINY_PATCH_SIZE = 14
# (height, width), as llava-hf reads them
TINY_PINPOINTS_HW = [[28, 56], [56, 28], [56, 56]]
TINY_VOCAB_SIZE = 64  # embedding rows of the llava-hf fixture (base vocab + <image> + <pad>, padded)

# Llama-3 special tokens first, then a few words for prompts; ids are list positions.
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<unk>",
]
WORDS = (
    "system user assistant you are a helpful language and vision what is in the image picture "
    "photo describe this it there cat dog red blue green yes no color of on ? . ,"
).split()
BASE_VOCAB = LLAMA3_SPECIALS + WORDS  # the lmms-lab tokenizer: no <image>, no <pad>

SYSTEM_TEXT = "You are a helpful language and vision assistant ."


def _base_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over BASE_VOCAB that prepends <|begin_of_text|> like Llama-3's."""
    vocab = {tok: i for i, tok in enumerate(BASE_VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    # registered as added special tokens so that they are never split by the pre-tokenizer
    raw.add_special_tokens([RawAddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    bos = "<|begin_of_text|>"
    raw.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        unk_token="<unk>",
    )


def make_tiny_tokenizer(with_image_tokens: bool = True) -> PreTrainedTokenizerFast:
    """The fixture tokenizer; with_image_tokens adds <image> then <pad> as special tokens (llava-hf)."""
    tok = _base_tokenizer()
    if with_image_tokens:
        tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        tok.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    return tok


def make_test_image(h: int, w: int) -> Image.Image:
    """A deterministic RGB image of height h and width w (gradients plus a checker pattern)."""
    ys, xs = np.mgrid[0:h, 0:w]
    r = (ys * 255) // max(h - 1, 1)
    g = (xs * 255) // max(w - 1, 1)
    b = ((ys // 7 + xs // 5) % 2) * 200 + 30
    arr = np.stack([r, g, b], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def write_image_data(data: Path, sizes, question: str = "what color is the cat ?", task_split: bool = True) -> None:
    """A calibration folder in `data`: one test image per (h, w) of `sizes` under sharegpt4v/, data.json
    with a record per image (`question` about it, answer "red") and, with `task_split`, a
    task_split.json that gives all records to sharegpt4v."""
    (data / "sharegpt4v").mkdir(parents=True)
    records = []
    for i, (h, w) in enumerate(sizes):
        make_test_image(h, w).save(data / "sharegpt4v" / f"{i}.png")
        records.append({"id": i, "image": f"sharegpt4v/{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": "red"}]})
    (data / "data.json").write_text(json.dumps(records))
    if task_split:
        (data / "task_split.json").write_text(json.dumps({"sharegpt4v": [0, len(records)]}))


def tiny_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
    )


def build_tiny_llava_next(tmp_dir, tie_word_embeddings: bool = False) -> Path:
    """Write a tiny random llava-hf LLaVA-NeXT model + processor under tmp_dir; return its path.

    A 40x56 image gives pixel_values (1, 5, 3, 28, 28) and 14 image tokens. With
    tie_word_embeddings the LM head is the input embedding (SmolLM2, Qwen2-0.5B, Llama-3.2-1B):
    the checkpoint holds that matrix once.
    """
    out = Path(tmp_dir) / ("tiny-llava-next-hf-tied" if tie_word_embeddings else "tiny-llava-next-hf")
    tok = make_tiny_tokenizer(with_image_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    text_config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    vision_config = tiny_vision_config()
    config = LlavaNextConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_id,
        image_grid_pinpoints=[list(p) for p in TINY_PINPOINTS_HW],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.save_pretrained(out)

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE},
        crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_grid_pinpoints=[list(p) for p in TINY_PINPOINTS_HW],
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=TINY_PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAMA3_LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------
# lmms-lab (original LLaVA-NeXT) layout


def _runtime_to_original(name: str) -> str:
    """Map a transformers 5.x runtime parameter name to the original LLaVA-NeXT key."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    if name == "lm_head.weight":
        return name
    if name == "model.image_newline":
        return name
    if name.startswith("model.multi_modal_projector.linear_1."):
        return "model.mm_projector.0." + name[len("model.multi_modal_projector.linear_1.") :]
    if name.startswith("model.multi_modal_projector.linear_2."):
        return "model.mm_projector.2." + name[len("model.multi_modal_projector.linear_2.") :]
    if name.startswith("model.vision_tower."):
        rest = name[len("model.vision_tower.") :]
        if not rest.startswith("vision_model."):  # transformers >= 5.6 dropped the wrapper
            rest = "vision_model." + rest
        return "model.vision_tower.vision_tower." + rest
    raise KeyError(f"no original name for {name}")


def build_tiny_lmms_lab(hf_dir, out_dir, vision_config_in: str = "tower_dir", n_shards: int = 2) -> Path:
    """Write the model in hf_dir in the lmms-lab layout under out_dir (which must not exist).

    Original key names, `mm_*` config fields, pinpoints as (width, height), tokenizer and
    embedding rows without the added <image>/<pad>. The tiny CLIP config is carried either in a
    local tower directory named by `mm_vision_tower` ("tower_dir"), in a `vision_config` entry of
    config.json ("config"), or not at all ("none": the converter then assumes ViT-L/14-336).
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    out.mkdir(parents=True)
    model = LlavaNextForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    cfg = model.config
    n_base = len(BASE_VOCAB)

    state = {}
    for name, tensor in model.state_dict().items():
        key = _runtime_to_original(name)
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[:n_base]
        state[key] = tensor.detach().clone().contiguous()

    keys = sorted(state)
    per = -(-len(keys) // n_shards)
    weight_map, total = {}, 0
    for i in range(n_shards):
        part = keys[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(out / fname), metadata={"format": "pt"})
        for k in part:
            weight_map[k] = fname
            total += state[k].numel() * state[k].element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )

    tc, vc = cfg.text_config, cfg.vision_config
    rope = dict(tc.rope_parameters)
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "attention_bias": tc.attention_bias,
        "attention_dropout": 0.0,
        "bos_token_id": tc.bos_token_id,
        "eos_token_id": tc.eos_token_id,
        "hidden_act": tc.hidden_act,
        "hidden_size": tc.hidden_size,
        "initializer_range": tc.initializer_range,
        "intermediate_size": tc.intermediate_size,
        "max_position_embeddings": tc.max_position_embeddings,
        "num_attention_heads": tc.num_attention_heads,
        "num_hidden_layers": tc.num_hidden_layers,
        "num_key_value_heads": tc.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": tc.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": rope["rope_theta"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.40.0.dev0",
        "use_cache": True,
        "vocab_size": n_base,
        "image_aspect_ratio": "anyres",
        "image_crop_resolution": None,
        "image_grid_pinpoints": [[w, h] for h, w in cfg.image_grid_pinpoints],
        "image_split_resolution": None,
        "mm_hidden_size": vc.hidden_size,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": cfg.vision_feature_layer,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "tokenizer_model_max_length": 256,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
    }
    vision_fields = {
        "model_type": "clip_vision_model",
        "hidden_size": vc.hidden_size,
        "intermediate_size": vc.intermediate_size,
        "projection_dim": vc.projection_dim,
        "num_hidden_layers": vc.num_hidden_layers,
        "num_attention_heads": vc.num_attention_heads,
        "image_size": vc.image_size,
        "patch_size": vc.patch_size,
        "hidden_act": vc.hidden_act,
        "layer_norm_eps": vc.layer_norm_eps,
    }
    if vision_config_in == "tower_dir":
        (out / "clip_tower").mkdir()
        (out / "clip_tower" / "config.json").write_text(json.dumps(vision_fields, indent=2))
        config["mm_vision_tower"] = "clip_tower"
    elif vision_config_in == "config":
        config["vision_config"] = vision_fields
    elif vision_config_in != "none":
        raise ValueError(vision_config_in)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tc.bos_token_id, "eos_token_id": tc.eos_token_id}, indent=2)
    )
    make_tiny_tokenizer(with_image_tokens=False).save_pretrained(out)
    return out
