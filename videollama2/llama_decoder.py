"""A Llama decoder (SmolLM2, the embedded default's) in VideoLLaMA2's Qwen2 form.

Qwen2's decoder is Llama's (RMSNorm, RoPE, SwiGLU MLP, grouped-query attention) plus biases on
the q/k/v projections, so a Llama decoder is a Qwen2 decoder whose q/k/v biases are zero. The
conversion refuses what Qwen2 cannot express (biased o_proj/MLP, a head width other than
hidden / heads, RoPE scaling).
"""

from __future__ import annotations

import torch

from mmprune.base.errors import UserInputError

# config.json fields of the released VideoLLaMA2 layout taken from the Llama config as they are
_SHARED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                  "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise UserInputError(f"the Llama decoder uses RoPE scaling {kind!r}, which the Qwen2 form does not express")
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def qwen2_fields_from_llama(config) -> dict:
    """config.json fields (released VideoLLaMA2 names) for a transformers LlamaConfig."""
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserInputError("the Llama decoder has biased o_proj / MLP layers; Qwen2 has none")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise UserInputError(f"the Llama decoder's head width {head_dim} is not hidden_size / heads; Qwen2 assumes it")
    fields = {k: getattr(config, k) for k in _SHARED_FIELDS if getattr(config, k, None) is not None}
    fields["rope_theta"] = _rope_theta(config)
    fields["use_sliding_window"] = False
    return fields


def qwen2_state_from_llama(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """The Llama causal LM's tensors under VideoLLaMA2's runtime names, with zero q/k/v biases
    (lm_head left out when the embeddings are tied)."""
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        out[key] = value
        for proj in ("q_proj", "k_proj", "v_proj"):
            if key.endswith(f"self_attn.{proj}.weight"):
                out[key[: -len("weight")] + "bias"] = torch.zeros(value.shape[0], dtype=value.dtype)
    return out
