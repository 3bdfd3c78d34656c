"""FitPrune's recipe search (Ye et al., "Fit and Prune", AAAI 2025, arXiv 2409.10197): bisection over
the tolerance α with the greedy per-layer fit (FIT) on calibration prompts, until the decoder's
FLOPs model meets the budget; the recipe is the mean fraction of visual tokens left after each layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from mmprune.base.errors import UserInputError
from mmprune.tokens.dropping import check_llama_like, forward_dropping, has_attention, slice_layer_kwargs
from mmprune.tokens.flops import DecoderDims, attention_macs, flops_reduction, post_macs
from mmprune.tokens.recipe import TokenRecipe
from mmprune.tokens.scores import fit_keep, visual_scores


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
