"""Build the tiny LLaVA-NeXT of the embedded default, entirely from in-memory configs.

The model has the real llava-hf architecture, only small: a CLIP vision tower, the 2-layer GELU
projector, `image_newline`, anyres tiling with unpadding, and a Llama decoder with GQA and RoPE.
Sizes are chosen so that

- hidden (128) and MLP (384) widths are multiples of 8, so 4:8 semi-structured sparsity applies;
- a 32x32 tile with 8x8 patches gives 16 patches per tile (plus CLS, dropped by the "default"
  strategy), and vision_feature_layer -2 reads the second of three CLIP layers;
- a 64x64 image becomes 16 base + 8x8 grid + 8 newline = 88 image tokens, more than the ~20 text
  tokens of a question, as image tokens dominate real LLaVA-NeXT sequences.

The tokenizer is word level (the synthetic task has a closed vocabulary) with Llama-3 style
special tokens and chat template, so prompts have the same structure as llama3-llava-next-8b.
"""

from __future__ import annotations

import itertools

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
# Imported directly: the torchvision-backed class is unavailable here and the auto class would
# warn about falling back to this PIL one on every load.
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava.embedded import synthetic_vqa as vqa

BOS = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
IMAGE = "<image>"
PAD = "<pad>"
UNK = "<unk>"
# Llama-3 puts its special tokens after the words and llava-hf appends <image> and <pad>.
SPECIAL_TOKENS = (BOS, START_HEADER, END_HEADER, EOT, UNK, IMAGE, PAD)

TILE = 32
PATCH = 8
IMAGE_GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]  # (height, width), as in llava-hf
# RoPE base: Llama-3 uses 5e5, whose rotations are too slow over a ~150-token sequence for the
# tiny decoder to tell tiles and grid rows apart by position.
ROPE_THETA = 10000.0

# Llama-3 style, as llava-hf's template and llava.convert's: per message a role header, the
# content (one <image> per image item, text trimmed) and <|eot_id|>; no system prompt. The
# generation prompt opens the assistant header. Content may be a plain string or a list of typed
# items. No BOS: the tokenizer adds it, so tools that tokenise the rendered text with special
# tokens (lmms-eval's llava_hf) get one BOS, not two; encode_record prepends it itself.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '" + START_HEADER + "' + message['role'] + '" + END_HEADER + "\n\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] | trim -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '" + IMAGE + "\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] | trim -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '" + EOT + "' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '" + START_HEADER + "assistant" + END_HEADER + "\n\n' -}}"
    "{%- endif -%}"
)


def _words(text: str) -> list:
    """Words the tokenizer's pre-tokenizer would produce (lower-cased)."""
    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())]


def task_vocabulary() -> list:
    """Every word of every question and answer the synthetic task can produce, plus roles."""
    words = set(_words("user assistant system"))
    fill = itertools.product(vqa.SHAPES, vqa.COLORS)
    for shape, color in fill:
        for templates in vqa.QUESTION_TEMPLATES.values():
            for template in templates:
                words.update(_words(template.format(shape=shape, color=color)))
    words.update(vqa.SHAPES, vqa.COLORS, vqa.COUNT_WORDS.values())
    words.update(("left", "right", "top", "bottom"))
    return sorted(words)


def build_tokenizer() -> PreTrainedTokenizerFast:
    words = task_vocabulary()
    vocab = {token: i for i, token in enumerate(words + list(SPECIAL_TOKENS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Special tokens must be "added" tokens: only those are split out of the raw text before
    # pre-tokenisation, which is what turns the processor's run of "<image>" strings into ids.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # Like Llama-3, encoding adds BOS in front (the chat template leaves it to the tokenizer).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOT, pad_token=PAD, unk_token=UNK,
        padding_side="right", model_max_length=512)


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaNextProcessor:
    tokenizer = tokenizer or build_tokenizer()
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=IMAGE_GRID_PINPOINTS)
    # num_additional_image_tokens=1 counts CLIP's CLS; with 0 the processor emits one image
    # token fewer than the model produces under the "default" strategy (models.md 1.4).
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        image_token=IMAGE, num_additional_image_tokens=1)


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlavaNextConfig:
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        image_size=TILE, patch_size=PATCH, hidden_act="quick_gelu", projection_dim=64)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlavaNextConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_grid_pinpoints=IMAGE_GRID_PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False)


def build_model(config: LlavaNextConfig, seed: int = 0) -> LlavaNextForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    # generate() stops on <|eot_id|> and pads with <pad> without being told each time
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    return model


def build(seed: int = 0) -> tuple:
    """(model, processor) with random weights."""
    processor = build_processor()
    return build_model(build_config(processor.tokenizer), seed), processor
