"""FitPrune's FLOPs model: multiply-accumulates of a decoder's prefill as visual tokens leave it.

A(n) (q, k, v projections and QKᵀ, AV, grouped-query aware) and B(n) (o_proj and the gated MLP)
per layer for n tokens, summed over the layers at the counts a recipe leaves; the reduction is
reported on visual tokens only (the paper's accounting) or with the text tokens counted too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from mmprune.tokens.recipe import TokenRecipe


@dataclass(frozen=True)
class DecoderDims:
    """Sizes that set a decoder layer's cost: hidden d, MLP width m, query and key/value widths."""

    num_layers: int
    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int

    @classmethod
    def from_config(cls, config) -> "DecoderDims":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads * head_dim, kv_heads * head_dim)


def attention_macs(n: float, dims: DecoderDims) -> float:
    """A(n): q, k, v projections and QKᵀ, AV for n tokens (3nd² + 2n²d without GQA)."""
    return n * dims.hidden * (dims.q_dim + 2 * dims.kv_dim) + 2 * n * n * dims.q_dim


def post_macs(n: float, dims: DecoderDims) -> float:
    """B(n): o_proj and the gated MLP for n tokens (nd² + 3ndm)."""
    return n * dims.q_dim * dims.hidden + 3 * n * dims.hidden * dims.intermediate


def layer_counts(n_visual: int, drops: Sequence[int]) -> list[int]:
    """n_0 .. n_L: visual tokens entering each layer (n_0 = n_visual) and leaving the last."""
    counts = [n_visual]
    for k in drops:
        counts.append(counts[-1] - k)
    if min(counts) < 0:
        raise ValueError(f"drop counts {list(drops)} remove more than {n_visual} tokens")
    return counts


def decoder_macs(counts: Sequence[int], dims: DecoderDims, n_text: int = 0) -> float:
    """Σ_l A(n_l + t) + B(n_{l+1} + t): the decoder's prefill cost, t text tokens counted or 0."""
    return sum(attention_macs(counts[l] + n_text, dims) + post_macs(counts[l + 1] + n_text, dims)
               for l in range(len(counts) - 1))


def flops_reduction(n_visual: int, drops: Sequence[int], dims: DecoderDims, n_text: int = 0) -> float:
    """1 - F(recipe)/F(dense). n_text=0 is the reference's visual-only accounting."""
    dense = decoder_macs([n_visual] * (len(drops) + 1), dims, n_text)
    return 1.0 - decoder_macs(layer_counts(n_visual, drops), dims, n_text) / dense


def recipe_flops(recipe: TokenRecipe, dims: DecoderDims, token_counts: Sequence[tuple[int, int]]) -> dict:
    """Mean analytic reduction over prompts given as (n_visual, n_text), applying the recipe's rounding:
    visual tokens only (the reference's accounting) and with text tokens counted."""
    visual = [flops_reduction(v, recipe.drops(v), dims) for v, _ in token_counts]
    total = [flops_reduction(v, recipe.drops(v), dims, t) for v, t in token_counts]
    return {"visual_only": sum(visual) / len(visual), "with_text": sum(total) / len(total)}
