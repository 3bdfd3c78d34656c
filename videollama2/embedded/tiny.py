"""The tiny VideoLLaMA2-AV of the embedded default: the released architecture, only small.

- Qwen2 decoder (GQA, RoPE, q/k/v biases), hidden and MLP widths multiples of 8 (4:8 applies);
  RoPE base 1e4 instead of the real 1e6, whose rotations are too slow over a 130-token sequence to
  tell the first half of the video tokens from the second;
- SigLIP on 64x64 frames with 8-px patches (8x8 patches), features from layer -2;
- STC connector v35 (RegStage depth `STC_DEPTH`), 8 frames -> 4 x 4 x 4 = 64 video tokens;
- BEATs (post-LN, deep norm, gated relative position bias, weight-normed conv positions), 128 mel
  bins and 16x16 patches as the real one: 8 clips of 0.125 s = 1 s of audio -> 98 frames ->
  6 x 8 = 48 audio tokens;
- audio MLP (mlp2x_gelu) to the LLM width.

Video and audio tokens (112, in about the real 1352 : 1496 proportion) outnumber the ~22 text
tokens of a prompt, as in the real model (2848 media tokens). The tokenizer is word level with Qwen2's special tokens and a
Qwen2-style chat template (default system message), so prompts have the released structure.
config.json follows the released fields; `vision_config`, `audio_config`, `stc_depth` and the
`audio_*` media fields are the small model's additions (absent in the released file).
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from videollama2.config import VideoLLaMA2Config
from videollama2.embedded import synthetic_av
from videollama2.model import VideoLLaMA2ForCausalLM

ENDOFTEXT, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, UNK)
SYSTEM_MESSAGE = "You are a helpful assistant."

# Qwen2's template structure: a default system message unless one is given, then
# <|im_start|>{role}\n{content}<|im_end|>\n per message, and the assistant header to generate.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '" + IM_START + "system\n" + SYSTEM_MESSAGE + IM_END + "\n' -}}"
    "{%- endif -%}"
    "{{- '" + IM_START + "' + message['role'] + '\n' + message['content'] + '" + IM_END + "\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + IM_START + "assistant\n' -}}{%- endif -%}"
)

NUM_FRAMES = 8
IMAGE_SIZE = 64
PATCH = 8
STC_DEPTH = 1
AUDIO_SECONDS = 1.0
AUDIO_CLIPS = 8
AUDIO_CLIP_SECONDS = 0.125

TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3, hidden_act="gelu_pytorch_tanh",
              layer_norm_eps=1e-6)
AUDIO = dict(embed_dim=32, encoder_embed_dim=64, encoder_layers=3, encoder_attention_heads=4,
             encoder_ffn_embed_dim=128, conv_pos=16, conv_pos_groups=4, num_buckets=32, max_distance=128)


def vocabulary(variant: str = "basic") -> list[str]:
    words = set(synthetic_av.vocabulary(variant))
    words.update(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(SYSTEM_MESSAGE.lower()))
    words.update(("system", "user", "assistant"))
    return sorted(words)


def build_tokenizer(variant: str = "basic") -> PreTrainedTokenizerFast:
    """Word-level tokenizer of the task variant's words (basic: the tiny model's)."""
    words = vocabulary(variant)
    vocab = {token: i for i, token in enumerate(words + list(SPECIAL_TOKENS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # added (special) tokens are split out of the text before pre-tokenisation
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=UNK,
                                   padding_side="right", model_max_length=1024, chat_template=CHAT_TEMPLATE)


def build_config(tokenizer) -> VideoLLaMA2Config:
    raw = {
        "architectures": ["Videollama2Qwen2ForCausalLM"],
        "model_type": "videollama2_qwen2",
        "vocab_size": len(tokenizer),
        **TEXT,
        "hidden_act": "silu",
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,  # the real 1e6 barely rotates over ~130 positions; order matters here
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        "eos_token_id": tokenizer.convert_tokens_to_ids(IM_END),
        "pad_token_id": tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        "torch_dtype": "float32",
        "mm_vision_tower": "embedded/tiny-siglip",
        "vision_config": dict(VISION),
        "mm_hidden_size": VISION["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "stc_connector_v35",
        "stc_depth": STC_DEPTH,
        "num_frames": NUM_FRAMES,
        "image_aspect_ratio": "pad",
        "mm_audio_tower": "embedded/tiny-beats",
        "audio_config": dict(AUDIO),
        "mm_hidden_size_a": AUDIO["encoder_embed_dim"],
        "hidden_size_a": TEXT["hidden_size"],
        "mm_projector_a_type": "mlp2x_gelu",
        "audio_seconds": AUDIO_SECONDS,
        "audio_clips": AUDIO_CLIPS,
        "audio_clip_seconds": AUDIO_CLIP_SECONDS,
        # the rules this model was trained with (upstream's are the defaults: videollama2/media.py)
        "audio_clip_spacing": "even",
        "audio_fbank_dtype": "float32",
        "use_cache": True,
    }
    return VideoLLaMA2Config(raw, "embedded tiny config")


def build(seed: int = 0) -> tuple[VideoLLaMA2ForCausalLM, PreTrainedTokenizerFast]:
    """(model, tokenizer) with random weights; SigLIP's pooling head and BEATs' classifier exist
    (unused), as in the released checkpoint."""
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = VideoLLaMA2ForCausalLM(build_config(tokenizer), vision_head=True, audio_predictor=True)
    return model, tokenizer
