"""Token rules: which calibration tokens a pruner's statistic is taken over, and with what weight.

One plug for every pruner that takes a per-token statistic (Wanda's ||X||, SparseGPT's Hessian).
A rule answers, per block and calibration sample, for each linear of the block: the indices of the
tokens that count (kind "subset"), or one weight per token (kind "weights"); `None` for the whole
sample means every token with weight 1 (a block without attention to rank tokens by).

A selector is a plain function (features N x d, last-token attention N, modality ids N) ->
long indices (a subset) or float weights (N); `SelectorRule` runs it on the block's or each
linear's features and shares one answer between linears that read the same tensor:
  AMIA: `amia_rule` (indices from `mmprune.prune.selection.amia.select_tokens`);
  attention weights: `attention_rule` (w = N a clamped to [floor, cap], scaled to mean 1).
ATV's drift rule (`DriftRule`, a subset) needs every sample's block output before it can pick
(the mean drift is over all samples), so it also takes the driver's dense pre-pass (`prescans`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from mmprune.base.errors import UserInputError
from mmprune.prune.attention import last_token_attention
from mmprune.prune.driver import LinearTaps
from mmprune.prune.selection.amia import AMIAConfig, select_tokens
from mmprune.prune.selection.atv import ATVConfig, DriftSelection, token_drift

Selector = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
KINDS = ("subset", "weights")


def tapped_keys(block: nn.Module, taps: LinearTaps) -> torch.Tensor | None:
    """k_proj's output from the block's forward, if the taps kept it (spares recomputing it)."""
    k_proj = getattr(getattr(block, "self_attn", None), "k_proj", None)
    for rel, linear in taps.linears.items():
        if linear is k_proj:
            return taps.outputs.get(rel)
    return None


@dataclass
class SelectorRule:
    """A selector run per sample: on the block's input/output (scope "block": one answer for all
    linears) or on each linear's input X / output Z (scope "linear", cached per tensor, so linears
    reading one input share one answer when features are "input")."""

    name: str
    kind: str  # "subset" or "weights"
    select: Selector
    features: str = "output"  # "output" or "input"
    scope: str = "linear"  # "linear" or "block"
    needs_attention: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"token rule kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def keep_outputs(self) -> bool:
        return self.features == "output" and self.scope == "linear"

    def begin_block(self, index: int) -> None:
        """Per-block state; none for a rule that decides each sample on its own."""

    def choose(self, index: int, sample: int, block: nn.Module, block_input: torch.Tensor,
               block_output: torch.Tensor, taps: LinearTaps, modality_ids: torch.Tensor,
               kwargs: dict) -> dict[str, torch.Tensor] | None:
        """Per linear (name inside the block): token indices or weights; None: every token counts."""
        attention = None
        if self.needs_attention:
            if getattr(block, "self_attn", None) is None:
                return None  # no attention to rank tokens by (e.g. an EAS block that skips it)
            keys = tapped_keys(block, taps)
            with taps.paused():  # the row calls q/k_proj, which must not replace the kept inputs
                attention = last_token_attention(
                    block, block_input, kwargs["position_embeddings"], kwargs.get("attention_mask"), keys
                )
        if self.scope == "block":
            features = (block_output if self.features == "output" else block_input)[0]
            chosen = self.select(features, attention, modality_ids)
            return {rel: chosen for rel in taps.inputs}
        cache: dict[int, torch.Tensor] = {}  # q/k/v (and gate/up) share one input tensor
        out: dict[str, torch.Tensor] = {}
        for rel, x in taps.inputs.items():
            features = taps.outputs[rel] if self.features == "output" else x
            key = features.data_ptr()
            if key not in cache:
                cache[key] = self.select(features, attention, modality_ids)
            out[rel] = cache[key]
        return out


def amia_rule(cfg: AMIAConfig) -> SelectorRule:
    """AMIA's representative tokens (a subset), on the features `cfg` names."""
    return SelectorRule("amia", "subset", lambda f, a, m: select_tokens(f, a, m, cfg), cfg.features, cfg.scope)


@dataclass(frozen=True)
class AttentionWeightConfig:
    """Token weights from the last token's attention a (sums to 1 over the N tokens):
    w = clamp(N a, floor, cap) / mean(clamp(N a, floor, cap)). N a has mean 1, so floor and cap are
    in units of the uniform weight; every token keeps at least floor / mean > 0 (the weighted
    Hessian has the rank of the unweighted one) and none, an attention sink included, more than
    cap / mean. floor = cap = 1 gives weight 1 everywhere."""

    floor: float = 0.1
    cap: float = 10.0

    def __post_init__(self) -> None:
        if not (0 < self.floor <= self.cap < float("inf")):
            raise UserInputError(
                f"token weight floor and cap must satisfy 0 < floor <= cap (finite), got floor {self.floor:g}, "
                f"cap {self.cap:g}; floor > 0 keeps every token in the Hessian (--token_weight_floor, "
                "--token_weight_cap)")


def attention_weights(attention: torch.Tensor, cfg: AttentionWeightConfig) -> torch.Tensor:
    """Per-token weights (float32, mean 1) from one attention row; see AttentionWeightConfig."""
    raw = attention.float() * attention.numel()
    clamped = raw.clamp(cfg.floor, cfg.cap)
    return clamped / clamped.mean()


def attention_rule(cfg: AttentionWeightConfig) -> SelectorRule:
    """Every token, weighted by the last token's attention (one weight vector per sample and block)."""
    return SelectorRule("attention", "weights", lambda f, a, m: attention_weights(a, cfg), "input", "block")


class DriftRule:
    """ATV-Pruning's tokens (a subset, one per block and sample, shared by every linear of the
    block): drifts from the driver's dense pre-pass, the selection from `DriftSelection`. The one
    path of both Wanda's `atv` and SparseGPT's `atv-obs`; `drift.report` holds what was kept."""

    name = "atv"
    kind = "subset"
    keep_outputs = False
    prescans = True  # the visitor forwards prescan()/end_prescan() of the driver here

    def __init__(self, cfg: ATVConfig, modality_names: dict[int, str]):
        self.cfg = cfg
        self.drift = DriftSelection(cfg, modality_names)

    def begin_block(self, index: int) -> None:
        self.drift.begin_block()

    def prescan(self, index: int, sample: int, block_input: torch.Tensor, block_output: torch.Tensor,
                modality_ids: torch.Tensor) -> None:
        self.drift.add(sample, token_drift(block_input, block_output), modality_ids)

    def end_prescan(self, index: int) -> None:
        self.drift.finish_block(index)

    def choose(self, index: int, sample: int, block: nn.Module, block_input: torch.Tensor,
               block_output: torch.Tensor, taps: LinearTaps, modality_ids: torch.Tensor,
               kwargs: dict) -> dict[str, torch.Tensor]:
        kept = self.drift.kept(sample).nonzero()[:, 0]  # ascending: the rows in token order
        return {rel: kept for rel in taps.inputs}


TokenRule = SelectorRule | DriftRule
