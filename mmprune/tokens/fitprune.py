"""FitPrune: training-free visual-token pruning inside the LLM to a FLOPs budget.

Ye et al., "Fit and Prune" (AAAI 2025, arXiv 2409.10197); docs/fitprune.md. Three parts:

- statistics: per layer, the max-over-heads attention probabilities Ā[q, k] from the visual block
  V (self score s_j) and from the tokens after it T (cross score c_j) to each visual token j,
  computed from the layer's own post-RoPE q and k (no N x N matrix is kept, no eager attention);
- the recipe search: bisection over the tolerance α with the greedy per-layer fit (FIT), on the
  decoder's FLOPs model (attention and MLP multiply-accumulates, grouped-query aware);
- inference: `apply_token_recipe(model, layers, recipe, visual_mask_of)` runs the model's own
  decoder layers on fewer tokens: after the attention of a dropping layer the rows of the
  lowest-scoring visual tokens (score s_j * c_j) leave the residual stream; deeper layers get the
  sliced position ids / RoPE / mask (original positions kept); the KV cache of each layer holds
  the tokens present at its input, decode never prunes.

Works on transformers' Llama-family decoder layers (`input_layernorm`, `self_attn.{q,k}_proj`,
`post_attention_layernorm`, `mlp`; RoPE passed in as `position_embeddings`), batch size 1.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from mmprune.prune.attention import _apply_rope
from mmprune.base.errors import UserInputError

RECIPE_FORMAT = "mmprune-fitprune-recipe"
RECIPE_VERSION = 1
# rows of the probability matrix computed at once (bounds memory to H * rows * n floats)
_ROW_CHUNK = 256


# --------------------------------------------------------------------------------------------
# FLOPs model (multiply-accumulates)


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


# --------------------------------------------------------------------------------------------
# Recipes


@dataclass
class TokenRecipe:
    """keep_fraction[l]: fraction of the prompt's visual tokens still present after layer l.

    Non-increasing, in [0, 1]; applies to any image size: a prompt with N visual tokens keeps
    max(1, round(keep_fraction[l] * N)) of them after layer l.
    """

    keep_fraction: list[float]
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        check_keep_fractions(self.keep_fraction)
        self.keep_fraction = [float(f) for f in self.keep_fraction]

    @property
    def num_layers(self) -> int:
        return len(self.keep_fraction)

    def kept_after(self, n_visual: int) -> list[int]:
        """Visual tokens left after each layer for a prompt with n_visual of them (at least 1)."""
        kept, current = [], n_visual
        for fraction in self.keep_fraction:
            current = min(current, max(1, int(round(fraction * n_visual))))
            kept.append(current)
        return kept

    def drops(self, n_visual: int) -> list[int]:
        counts = [n_visual] + self.kept_after(n_visual)
        return [counts[l] - counts[l + 1] for l in range(self.num_layers)]

    @classmethod
    def dense(cls, num_layers: int) -> "TokenRecipe":
        return cls([1.0] * num_layers, {"note": "keeps every token"})

    def to_json(self) -> dict:
        return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "num_layers": self.num_layers,
                "keep_fraction": [round(f, 8) for f in self.keep_fraction], **self.meta}


def check_keep_fractions(fractions) -> None:
    if not isinstance(fractions, (list, tuple)) or not fractions:
        raise UserInputError(f"keep_fraction must be a non-empty list (one value per decoder layer), "
                             f"got {fractions!r}")
    for layer, value in enumerate(fractions):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0.0 <= value <= 1.0:
            raise UserInputError(f"keep_fraction[{layer}] = {value!r} is outside [0, 1]; each entry is the "
                                 "fraction of visual tokens kept after that layer")
    for layer in range(1, len(fractions)):
        if fractions[layer] > fractions[layer - 1] + 1e-9:
            raise UserInputError(f"keep_fraction rises from {fractions[layer - 1]} (layer {layer - 1}) to "
                                 f"{fractions[layer]} (layer {layer}); dropped tokens cannot come back, "
                                 "so the fractions must be non-increasing")


def load_recipe(path) -> TokenRecipe:
    """A recipe JSON written by save_recipe (or by hand: {"keep_fraction": [...]})."""
    if not os.path.isfile(path):
        raise UserInputError(f"token recipe {path} does not exist; create one with "
                             "scripts/fitprune/search.sh")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"token recipe {path} is not valid JSON ({exc}); regenerate it") from None
    if not isinstance(data, dict) or "keep_fraction" not in data:
        raise UserInputError(f"token recipe {path} has no 'keep_fraction' list; regenerate it with "
                             "scripts/fitprune/search.sh")
    fractions = data["keep_fraction"]
    if isinstance(fractions, list) and data.get("num_layers", len(fractions)) != len(fractions):
        raise UserInputError(f"token recipe {path} says num_layers {data['num_layers']} but lists "
                             f"{len(data['keep_fraction'])} fractions; regenerate it")
    meta = {k: v for k, v in data.items() if k not in ("format", "version", "num_layers", "keep_fraction")}
    return TokenRecipe(data["keep_fraction"], meta)


def save_recipe(path, recipe: TokenRecipe) -> None:
    """Write atomically (a hidden temporary file renamed into place, removed on error or signal)."""
    from mmprune.base.output import write_json_file

    write_json_file(str(path), recipe.to_json())


def is_recipe_file(path) -> bool:
    """Whether `path` holds a recipe this project wrote (its "format" key): what --overwrite may replace."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == RECIPE_FORMAT and "keep_fraction" in data


# --------------------------------------------------------------------------------------------
# Attention statistics


def max_head_probs(query: torch.Tensor, key: torch.Tensor, first_row: int, v_start: int,
                   n_visual: int, scaling: float) -> torch.Tensor:
    """Ā[r, j] = max_h softmax_causal(q_h k_hᵀ·scaling)[r, v_start + j] for the query rows first_row..n-1.

    query (H, n, hd) and key (KV, n, hd) are post-RoPE for the current sequence of n tokens (query
    head h uses key head h // (H/KV)). float32, (n - first_row, n_visual).
    """
    n_heads, n_tokens, head_dim = query.shape
    n_kv = key.shape[0]
    groups = n_heads // n_kv
    keys_t = key.float().transpose(1, 2)  # (KV, hd, n)
    out = []
    for begin in range(first_row, n_tokens, _ROW_CHUNK):
        rows = min(_ROW_CHUNK, n_tokens - begin)
        # causal mask as an additive bias: row i (position begin + i) sees columns 0..begin + i
        bias = torch.full((rows, n_tokens), float("-inf"), device=query.device).triu_(begin + 1)
        # query heads of one key head side by side: scale, mask and QKᵀ in one batched baddbmm
        q = query[:, begin:begin + rows].float().reshape(n_kv, groups * rows, head_dim)
        logits = torch.baddbmm(bias.repeat(groups, 1), q, keys_t, alpha=scaling)
        probs = torch.softmax(logits, dim=-1).view(n_kv, groups, rows, n_tokens)
        out.append(probs[..., v_start:v_start + n_visual].amax(dim=(0, 1)))
    return torch.cat(out)


def visual_scores(query: torch.Tensor, key: torch.Tensor, v_start: int, n_visual: int,
                  scaling: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(s, c, |T|): self score s_j = Σ_{i∈V} Ā[i, j] / |V| and the unnormalised cross score
    c_j = Σ_{t∈T} Ā[t, j] for each current visual token j, with T every token after V."""
    n_tokens = query.shape[1]
    probs = max_head_probs(query, key, v_start, v_start, n_visual, scaling)
    return probs[:n_visual].sum(0) / n_visual, probs[n_visual:].sum(0), n_tokens - v_start - n_visual


def product_drop(s: torch.Tensor, c: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Indices of the n_drop visual tokens with the lowest s*c (ties: the earlier position first)."""
    return torch.sort(s * c, stable=True).indices[:n_drop]


def product_keep(s: torch.Tensor, c: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Sorted indices of the visual tokens kept at inference (the complement of product_drop)."""
    keep = torch.ones_like(s, dtype=torch.bool)
    keep[product_drop(s, c, n_drop)] = False
    return keep.nonzero().flatten()


def _deletable(scores: torch.Tensor, floor: float) -> torch.Tensor:
    """Mask of the largest set of lowest-score tokens whose removal keeps Σ kept ≥ floor."""
    order = torch.sort(scores, stable=True).indices
    remaining = scores.sum() - torch.cumsum(scores[order], 0)  # kept mass after deleting 1..n lowest
    count = int((remaining >= floor).sum())  # remaining is non-increasing: a prefix qualifies
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def fit_keep(s: torch.Tensor, c_mean: torch.Tensor, s_ref: float, c_ref: float, alpha: float) -> torch.Tensor:
    """The search's rule: drop D_s ∩ D_c, where D_x holds as many lowest-x tokens as possible while
    the kept x-mass stays ≥ (1-α)·reference; at least one visual token stays."""
    drop = _deletable(s, (1 - alpha) * s_ref) & _deletable(c_mean, (1 - alpha) * c_ref)
    if bool(drop.all()):  # keep the best-scoring token (by product) so V never empties
        drop[torch.argmax(s * c_mean)] = False
    return (~drop).nonzero().flatten()


# --------------------------------------------------------------------------------------------
# One decoder layer run on fewer tokens


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


# --------------------------------------------------------------------------------------------
# Inference


def visual_block(visual_mask: torch.Tensor | None) -> tuple[int, int]:
    """(start, count) of the one contiguous run of visual tokens in a (1, L) boolean mask."""
    if visual_mask is None:
        raise UserInputError("a token recipe needs the prompt's input_ids to find its visual tokens; "
                             "call the model with input_ids, not inputs_embeds")
    if visual_mask.dim() != 2 or visual_mask.shape[0] != 1:
        raise UserInputError(f"token recipes run with batch size 1 (each prompt keeps its own tokens); "
                             f"got a batch of {visual_mask.shape[0]}")
    positions = visual_mask[0].nonzero().flatten()
    if positions.numel() == 0:
        raise UserInputError("the prompt has no visual tokens, so a token recipe has nothing to prune; "
                             "evaluate text-only prompts without --token_recipe")
    start, count = int(positions[0]), int(positions.numel())
    if int(positions[-1]) != start + count - 1:
        raise UserInputError("the prompt's visual tokens are not one contiguous block (several images?); "
                             "token recipes support one image per prompt")
    return start, count


_SLICED_KWARGS = ("position_ids", "position_embeddings", "attention_mask")


def _sliced_for_keep(state: "_DropState", named: dict, device) -> dict:
    """slice_layer_kwargs for the tokens present now, computed once per drop: the layers between two
    drops get the same position and mask tensors, so their slices are reused."""
    source = tuple(named.get(k) for k in _SLICED_KWARGS)
    cached = state.sliced
    if cached is None or cached[0] is not state.keep or any(a is not b for a, b in zip(cached[1], source)):
        part = slice_layer_kwargs(dict(zip(_SLICED_KWARGS, source)), state.keep.to(device))
        cached = state.sliced = (state.keep, source, part)
    return {**named, **{k: v for k, v in cached[2].items() if k in named}}


class _DropState:
    """Per-call bookkeeping shared by the wrapped layers (one model, batch size 1)."""

    def __init__(self, recipe: TokenRecipe, restore_length: bool):
        self.recipe = recipe
        self.restore_length = restore_length
        self.visual_mask = None       # from the latest top-level call
        self.active = False           # inside a pruned prefill
        self.keep = None              # original indices of the tokens present now
        self.start = self.n_current = 0
        self.targets: list[int] = []  # visual tokens left after each layer
        self.layer_inputs: list | None = None  # per layer: original indices present at its input
        self.prefill_length = 0
        self.last_dropped: list[int] = []
        self.sliced = None            # (keep, source tensors, their slices) of the latest slicing


class TokenRecipeHandle:
    """What apply_token_recipe returns: `remove()` restores the model; also a context manager.
    `last_drops` lists the tokens dropped per layer in the latest prefill."""

    def __init__(self, state: _DropState, restore: Callable):
        self._state, self._restore = state, restore

    @property
    def last_drops(self) -> list[int]:
        return list(self._state.last_dropped)

    @property
    def last_layer_inputs(self) -> list[torch.Tensor]:
        """Per layer, the prompt positions present at its input in the latest prefill, then the
        positions that left the last layer."""
        return list(self._state.layer_inputs or []) + [self._state.keep]

    def remove(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _cache_length(cache, layer_index: int) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length(layer_index))
    except (TypeError, IndexError):
        return int(cache.get_seq_length())


def apply_token_recipe(model: nn.Module, layers: nn.ModuleList, recipe: TokenRecipe,
                       visual_mask_of: Callable[[tuple, dict], torch.Tensor | None],
                       restore_length: bool = True) -> TokenRecipeHandle:
    """Make `model` drop visual tokens in its prefill as `recipe` says, until handle.remove().

    `layers` are the decoder layers of `model`; `visual_mask_of(args, kwargs)` reads a (1, L) boolean
    visual-token mask from a call of `model` (None when it cannot tell). With restore_length the last
    layer's output is scattered back to the prompt length (dropped positions hold zeros, so their
    logits are meaningless but every kept position keeps its index); otherwise outputs cover kept
    tokens only.
    """
    if recipe.num_layers != len(layers):
        raise UserInputError(f"the token recipe has {recipe.num_layers} layers but the model has {len(layers)} "
                             "decoder layers; the recipe belongs to another model: run the search on this one")
    previous = 1.0
    for index, layer in enumerate(layers):
        if recipe.keep_fraction[index] < previous:  # only dropping layers run their parts themselves
            check_llama_like(layer, index)
        previous = recipe.keep_fraction[index]
    if getattr(model, "_mmprune_token_recipe", None) is not None:
        raise UserInputError("a token recipe is already applied to this model; remove() it first")
    state = _DropState(recipe, restore_length)
    last = len(layers) - 1
    originals = []

    def top_hook(module, args, kwargs):
        state.visual_mask = visual_mask_of(args, kwargs)

    def make_forward(index: int, layer: nn.Module, original: Callable):
        names = list(inspect.signature(original).parameters)

        def forward(*args, **kwargs):
            named = dict(zip(names, args), **kwargs)
            hidden = named.pop(names[0])
            cache = named.get("past_key_values", named.get("cache"))  # "cache" from transformers 5.24
            if index == 0:
                state.active = hidden.shape[1] > 1 and _cache_length(cache, 0) == 0
                if state.active:
                    _start_prefill(state, hidden)
            if not state.active:  # decode or a continuation: each layer sees its own cache columns
                if state.layer_inputs is not None and cache is not None:
                    mask = named.get("attention_mask")
                    if torch.is_tensor(mask) and mask.dim() == 4:
                        extra = torch.arange(state.prefill_length, mask.shape[-1], device=mask.device)
                        named = slice_layer_kwargs(named, None, torch.cat([state.layer_inputs[index].to(mask.device), extra]))
                return original(hidden, **named)
            state.layer_inputs.append(state.keep)
            if state.keep.numel() != state.prefill_length:
                named = _sliced_for_keep(state, named, hidden.device)
            n_drop = state.n_current - state.targets[index]
            if n_drop <= 0:
                out = original(hidden, **named)
                state.last_dropped.append(0)
            else:
                start, n_cur = state.start, state.n_current

                def decide(query, key):
                    s, c, _ = visual_scores(query, key, start, n_cur, layer.self_attn.scaling)
                    keep = torch.ones(query.shape[1], dtype=torch.bool, device=query.device)
                    keep[product_drop(s, c, n_drop) + start] = False
                    return keep.nonzero().flatten()

                out, keep_local = forward_dropping(layer, hidden, decide, **named)
                state.keep = state.keep[keep_local.to(state.keep.device)]
                state.n_current -= n_drop
                state.last_dropped.append(n_drop)
            if index == last:
                state.sliced = None  # the slices are of no use after the prefill
                if state.restore_length and state.keep.numel() != state.prefill_length:
                    full = out.new_zeros(out.shape[0], state.prefill_length, out.shape[-1])
                    full[:, state.keep.to(out.device)] = out
                    out = full
            return out

        return forward

    def _start_prefill(st: _DropState, hidden: torch.Tensor):
        if st.visual_mask is None or st.visual_mask.shape[-1] != hidden.shape[1]:
            st.visual_mask = None
        st.start, n_visual = visual_block(st.visual_mask)
        st.n_current = n_visual
        st.targets = recipe.kept_after(n_visual)
        st.prefill_length = hidden.shape[1]
        st.keep = torch.arange(hidden.shape[1])
        st.layer_inputs = []
        st.last_dropped = []
        st.sliced = None

    handle_top = model.register_forward_pre_hook(top_hook, with_kwargs=True)
    model._mmprune_token_recipe = recipe  # lets callers (llava.eval) see that prefills prune
    for index, layer in enumerate(layers):
        originals.append(layer.forward)
        layer.forward = make_forward(index, layer, layer.forward)

    def restore():
        handle_top.remove()
        model._mmprune_token_recipe = None
        for layer in layers:
            if "forward" in vars(layer):
                del layer.forward  # back to the class method

    return TokenRecipeHandle(state, restore)


# --------------------------------------------------------------------------------------------
# Recipe search


@dataclass
class CalibSample:
    """What enters decoder layer 0 for one calibration prompt, and where its visual block is."""

    hidden: torch.Tensor          # (1, L, d)
    kwargs: dict                  # the layer's call kwargs (position_embeddings, position_ids, mask)
    v_start: int
    n_visual: int


@dataclass
class SearchResult:
    recipe: TokenRecipe
    alpha: float
    trace: list                   # (alpha, reached, visual-only reduction of the fit) per bisection step


def _prefill_kwargs(kwargs: dict) -> dict:
    out = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "use_cache")}
    mask = out.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 4 and bool(mask.dtype == torch.bool and mask.tril().all()):
        out["attention_mask"] = None  # a plain causal mask: sdpa's is_causal path, as at inference
    return out


@torch.no_grad()
def _reference_masses(layers, samples, progress: bool) -> list[list[tuple[float, float]]]:
    """(Ŝ_l(x), Ĉ_l(x)) on the unpruned model for every sample x and layer l."""
    masses = []
    for sample in tqdm(samples, desc="fitprune statistics", disable=not progress):
        hidden, per_layer = sample.hidden, []
        kwargs = _prefill_kwargs(sample.kwargs)
        for layer in layers:
            if not has_attention(layer):  # an attention-skipping (EAS) layer sees every token, drops none
                hidden = layer(hidden, **kwargs)
                per_layer.append((0.0, 0.0))
                continue

            def decide(query, key, layer=layer):
                s, c, n_text = visual_scores(query, key, sample.v_start, sample.n_visual, layer.self_attn.scaling)
                per_layer.append((float(s.sum()), float(c.sum()) / max(n_text, 1)))
                return None
            hidden, _ = forward_dropping(layer, hidden, decide, **kwargs)
        masses.append(per_layer)
    return masses


@torch.no_grad()
def _fit(layers, samples, masses, dims: DecoderDims, budget: float, alpha: float):
    """FIT(α): greedy per-layer drops on every sample; returns (per-sample drop lists, reached)."""
    n_layers = len(layers)
    attends = [has_attention(layer) for layer in layers]

    def attn(n: float, l: int) -> float:  # layers without attention (EAS) cost their FFN side only
        return attention_macs(n, dims) if attends[l] else 0.0

    def rest(n: float, l: int) -> float:  # cost of layers l+1.. at n visual tokens
        return sum(attn(n, j) + post_macs(n, dims) for j in range(l + 1, n_layers))

    states = [(s.hidden, _prefill_kwargs(s.kwargs), s.n_visual) for s in samples]
    drops = [[0] * n_layers for _ in samples]
    used = [0.0] * len(samples)
    target = (1 - budget) * sum(rest(s.n_visual, -1) for s in samples) / len(samples)
    for l, layer in enumerate(layers):
        projected = 0.0
        for x, (_, _, n) in enumerate(states):
            used[x] += attn(n, l)
            projected += used[x] + post_macs(n, dims) + rest(n, l)
        if projected / len(samples) <= target:
            return drops, True
        if not attends[l]:
            for x, (hidden, kwargs, n) in enumerate(states):
                states[x] = (layer(hidden, **kwargs), kwargs, n)
                used[x] += post_macs(n, dims)
            continue
        for x, sample in enumerate(samples):
            hidden, kwargs, n = states[x]
            s_ref, c_ref = masses[x][l]
            start = sample.v_start

            def decide(query, key, n=n, start=start, s_ref=s_ref, c_ref=c_ref):
                s, c, n_text = visual_scores(query, key, start, n, layer.self_attn.scaling)
                kept = fit_keep(s, c / max(n_text, 1), s_ref, c_ref, alpha) + start
                if kept.numel() == n:
                    return None
                device = query.device
                return torch.cat([torch.arange(start, device=device), kept,
                                  torch.arange(start + n, query.shape[1], device=device)])

            length = hidden.shape[1]
            hidden, keep = forward_dropping(layer, hidden, decide, **kwargs)
            if keep is not None:
                kwargs = slice_layer_kwargs(kwargs, keep)
                drops[x][l] = length - keep.numel()
            n_after = n - drops[x][l]
            used[x] += post_macs(n_after, dims)
            states[x] = (hidden, kwargs, n_after)
    # not in the reference loop: the last layer's drops may already meet the budget
    return drops, sum(used) / len(samples) <= target


def search_recipe(layers: nn.ModuleList, samples: list[CalibSample], dims: DecoderDims, budget: float,
                  tolerance: float = 0.01, progress: bool = True) -> SearchResult:
    """Bisection over α in [0, 1] for the smallest α whose FIT meets the FLOPs budget.

    The recipe's keep_fraction[l] is the mean over samples of (visual tokens left after l) / N_x.
    """
    if not 0.0 < budget < 1.0:
        raise UserInputError(f"FLOPs budget {budget} must be in (0, 1): the fraction of the visual "
                             "tokens' decoder FLOPs to remove")
    if not samples:
        raise UserInputError("no calibration samples; check the data path and --nsamples")
    if len(layers) != dims.num_layers:
        raise ValueError(f"{len(layers)} layers but dims say {dims.num_layers}")
    for index, layer in enumerate(layers):
        if has_attention(layer):
            check_llama_like(layer, index)
    masses = _reference_masses(layers, samples, progress)
    lo, hi, best, trace = 0.0, 1.0, None, []
    steps = max(1, math.ceil(math.log2(1.0 / tolerance)))
    for _ in tqdm(range(steps), desc=f"fitprune search (budget {budget})", disable=not progress):
        alpha = (lo + hi) / 2
        drops, reached = _fit(layers, samples, masses, dims, budget, alpha)
        fit_reduction = sum(flops_reduction(s.n_visual, d, dims) for s, d in zip(samples, drops)) / len(samples)
        trace.append({"alpha": alpha, "reached": reached, "fit_flops_reduction": fit_reduction})
        if reached:
            hi, best = alpha, (alpha, drops)
        else:
            lo = alpha
    if best is None:
        raise UserInputError(f"no tolerance α < 1 reaches a {budget:.0%} FLOPs reduction on these samples "
                             f"(the last fit reached {trace[-1]['fit_flops_reduction']:.1%}); lower the budget")
    alpha, drops = best
    keep = []
    for l in range(len(layers)):
        keep.append(sum((s.n_visual - sum(d[:l + 1])) / s.n_visual for s, d in zip(samples, drops)) / len(samples))
    keep = [min(1.0, max(0.0, f)) for f in keep]
    for l in range(1, len(keep)):  # guard float noise so the list stays non-increasing
        keep[l] = min(keep[l], keep[l - 1])
    return SearchResult(TokenRecipe(keep), alpha, trace)


def recipe_flops(recipe: TokenRecipe, dims: DecoderDims, token_counts: Sequence[tuple[int, int]]) -> dict:
    """Mean analytic reduction over prompts given as (n_visual, n_text), applying the recipe's rounding:
    visual tokens only (the reference's accounting) and with text tokens counted."""
    visual = [flops_reduction(v, recipe.drops(v), dims) for v, _ in token_counts]
    total = [flops_reduction(v, recipe.drops(v), dims, t) for v, t in token_counts]
    return {"visual_only": sum(visual) / len(visual), "with_text": sum(total) / len(total)}
