"""One decoder layer run on fewer tokens: the layer's own parts with a token-drop step between the
attention and the MLP, and the position ids, RoPE and mask sliced to the tokens kept.

Works on transformers' Llama-family decoder layers (`input_layernorm`, `self_attn.{q,k}_proj`,
`post_attention_layernorm`, `mlp`; RoPE passed in as `position_embeddings`), batch size 1.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from mmprune.base.errors import UserInputError
from mmprune.prune.attention import _apply_rope


def has_attention(layer: nn.Module) -> bool:
    """False for a layer whose attention was removed (an EAS-skipped layer): it drops no tokens."""
    return getattr(layer, "self_attn", None) is not None


def check_llama_like(layer: nn.Module, index: int) -> None:
    missing = [n for n in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp") if not hasattr(layer, n)]
    if missing or not hasattr(getattr(layer, "self_attn", None), "q_proj"):
        raise UserInputError(f"decoder layer {index} ({type(layer).__name__}) is not a Llama-style layer "
                             f"(missing {', '.join(missing) or 'self_attn.q_proj'}); token recipes need "
                             "input_layernorm, self_attn.{q,k}_proj, post_attention_layernorm and mlp")


@contextmanager
def _capture_qk(attn: nn.Module):
    """Record the outputs of q_proj and k_proj during the attention call (no extra matmuls)."""
    seen = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o))]
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def _rope_qk(attn: nn.Module, seen: dict, position_embeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE query (H, n, hd) and key (KV, n, hd) of batch row 0 from the captured projections."""
    head_dim = attn.head_dim
    q = seen["q"][:1].view(1, seen["q"].shape[1], -1, head_dim)
    k = seen["k"][:1].view(1, seen["k"].shape[1], -1, head_dim)
    if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms come before RoPE
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = position_embeddings
    cos, sin = cos[:1].unsqueeze(1), sin[:1].unsqueeze(1)
    return _apply_rope(q.transpose(1, 2), cos, sin)[0], _apply_rope(k.transpose(1, 2), cos, sin)[0]


def forward_dropping(layer: nn.Module, hidden_states: torch.Tensor, decide: Callable, **kwargs):
    """The layer's computation with a token-drop step between attention and MLP.

    `decide(query, key)` gets the post-RoPE q (H, n, hd), k (KV, n, hd) and returns sorted indices of
    the tokens to keep (or None: keep all). Returns (output for kept tokens, keep indices or None).
    The attention runs through the module unchanged (sdpa, KV-cache update on all its input tokens).
    """
    attn = layer.self_attn
    residual = hidden_states
    normed = layer.input_layernorm(hidden_states)
    with _capture_qk(attn) as seen:
        attn_out, _ = attn(hidden_states=normed, **kwargs)
    keep = decide(*_rope_qk(attn, seen, kwargs["position_embeddings"]))
    if keep is not None:
        residual, attn_out = residual[:, keep], attn_out[:, keep]
    hidden = residual + attn_out
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden)), keep


def slice_layer_kwargs(kwargs: dict, keep: torch.Tensor, columns: torch.Tensor | None = None) -> dict:
    """Position ids, RoPE (cos, sin) and a 4-D mask restricted to the kept tokens.

    keep indexes the query positions (None: leave rows alone); columns the key positions of the
    layer's cache (default: keep, the prefill case)."""
    out = dict(kwargs)
    if keep is not None:
        if torch.is_tensor(out.get("position_ids")):
            out["position_ids"] = out["position_ids"][..., keep]
        if out.get("position_embeddings") is not None:
            out["position_embeddings"] = tuple(t[:, keep] for t in out["position_embeddings"])
    mask = out.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 4:
        if keep is not None and mask.shape[-2] > 1:
            mask = mask[:, :, keep]
        columns = keep if columns is None else columns
        if columns is not None:
            mask = mask[..., columns]
        out["attention_mask"] = mask
    return out
