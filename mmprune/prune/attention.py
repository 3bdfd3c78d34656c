"""Attention of the last token to every token, for one decoder block, without the N x N matrix.

Works on transformers' Llama-family decoder layers (Llama, Qwen2: `input_layernorm`,
`self_attn.{q,k}_proj`, RoPE passed in as `position_embeddings=(cos, sin)`). Cost O(H N d_head).
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _last_row_of_mask(attention_mask, n_tokens: int, device) -> torch.Tensor | None:
    """Additive float bias for the last query row, from a 4-D mask if the model built one."""
    if attention_mask is None or not torch.is_tensor(attention_mask) or attention_mask.dim() != 4:
        return None
    row = attention_mask[0, 0, -1, -n_tokens:].to(device)
    if row.dtype == torch.bool:
        return torch.zeros(row.shape, device=device).masked_fill(~row, float("-inf"))
    return row.float()


@torch.no_grad()
def last_token_attention(
    block: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    key_states: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged softmax attention of the last token over all N tokens (float32, shape N).

    Equals the last row of the block's causal attention probabilities averaged over heads.
    `key_states`: k_proj's output for these hidden states (N x KV*hd, before RoPE), when the
    caller already has it from the block's forward; the key projection, the dominant cost, is
    then not recomputed.
    """
    attn = block.self_attn
    config = attn.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = attn.head_dim
    n_tokens = hidden_states.shape[1]
    # the norm is per token: with the keys given, only the last token's normalised state is needed
    x = block.input_layernorm(hidden_states if key_states is None else hidden_states[:, -1:])
    query = attn.q_proj(x[:, -1:]).view(1, 1, n_heads, head_dim).transpose(1, 2)  # (1, H, 1, hd)
    if key_states is None:
        key_states = attn.k_proj(x)
    key = key_states.reshape(1, n_tokens, n_kv, head_dim).transpose(1, 2)  # (1, KV, N, hd)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms, if the block has them
        query, key = attn.q_norm(query), attn.k_norm(key)
    cos, sin = position_embeddings
    cos, sin = cos.to(x.device).unsqueeze(1), sin.to(x.device).unsqueeze(1)  # (1, 1, N, hd)
    query = _apply_rope(query, cos[:, :, -1:], sin[:, :, -1:])
    key = _apply_rope(key, cos, sin)
    groups = n_heads // n_kv
    # query heads h = kv * groups + g share key head kv (GQA); no key expansion needed
    q = query.reshape(n_kv, groups, head_dim).float()
    k = key.reshape(n_kv, n_tokens, head_dim).float()
    logits = torch.einsum("kgd,knd->kgn", q, k).reshape(n_heads, n_tokens) * attn.scaling
    bias = _last_row_of_mask(attention_mask, n_tokens, logits.device)
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=-1).mean(dim=0)
