"""Token recipes at inference: `apply_token_recipe(model, layers, recipe, visual_mask_of)` makes the
model's own decoder layers drop visual tokens in every prefill.

After the attention of a dropping layer the rows of the lowest-scoring visual tokens (score
s_j * c_j) leave the residual stream; deeper layers get the sliced position ids / RoPE / mask
(original positions kept); the KV cache of each layer holds the tokens present at its input, and
decode never prunes.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from mmprune.base.errors import UserInputError
from mmprune.tokens.dropping import check_llama_like, forward_dropping, slice_layer_kwargs
from mmprune.tokens.recipe import TokenRecipe
from mmprune.tokens.scores import product_drop, visual_scores


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
