"""Wanda pruning (|W| * ||X||, per-row groups or N:M), with pluggable per-linear sparsity (uniform,
DAS, OWL, ...) and pluggable tokens in ||X|| (all tokens, AMIA's representative set, or ATV's
text plus highest-drift visual tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmprune.prune.selection.amia import AMIAConfig, select_tokens
from mmprune.prune.selection.atv import ATVConfig, DriftSelection, token_drift
from mmprune.prune.attention import last_token_attention
from mmprune.prune.allocation.das import linear_name
from mmprune.prune.driver import LinearTaps
from mmprune.prune.masks import mask_for_pattern
from mmprune.prune.sparsity import SparsityPattern
from mmprune.prune.stats import InputNorms, wanda_score


@dataclass
class LinearResult:
    name: str
    shape: tuple[int, int]
    target: float
    zeros: int

    @property
    def achieved(self) -> float:
        return self.zeros / (self.shape[0] * self.shape[1])


@dataclass
class SelectionStats:
    """How many tokens AMIA kept, per block, summed over samples and linears."""

    selected: dict[int, int] = field(default_factory=dict)
    total: dict[int, int] = field(default_factory=dict)

    def add(self, block: int, selected: int, total: int) -> None:
        self.selected[block] = self.selected.get(block, 0) + selected
        self.total[block] = self.total.get(block, 0) + total

    def fractions(self) -> dict[int, float]:
        return {b: self.selected[b] / self.total[b] for b in self.selected}


def _tapped_keys(block: nn.Module, taps: LinearTaps) -> torch.Tensor | None:
    """k_proj's output from the block's forward, if the taps kept it (spares recomputing it)."""
    k_proj = getattr(getattr(block, "self_attn", None), "k_proj", None)
    for rel, linear in taps.linears.items():
        if linear is k_proj:
            return taps.outputs.get(rel)
    return None


class WandaPruner:
    """Block visitor for the sequential driver: statistics, then masks, block by block."""

    modifies_block = True

    def __init__(
        self,
        prefix: str,
        pattern: SparsityPattern,
        sparsity: dict[str, float],
        amia: AMIAConfig | None = None,
        row_rounding: str = "distribute",
        atv: ATVConfig | None = None,
        modality_names: dict[int, str] | None = None,
    ):
        self.prefix = prefix
        self.pattern = pattern
        self.sparsity = sparsity
        self.amia = amia
        self.row_rounding = row_rounding
        self.keep_outputs = amia is not None and amia.features == "output" and amia.scope == "linear"
        self.results: list[LinearResult] = []
        self.selection = SelectionStats()
        self._norms = InputNorms()
        self._block: nn.Module | None = None
        if atv is not None and amia is not None:
            raise ValueError("AMIA and ATV are two token rules; give one")
        self.atv = DriftSelection(atv, modality_names or {}) if atv is not None else None
        self.prescans = self.atv is not None  # the driver runs prescan() over every sample first

    def begin_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        self._norms = InputNorms()
        self._block = block
        if self.atv is not None:
            self.atv.begin_block()

    def prescan(self, index, sample, block_input, block_output, modality_ids) -> None:
        self.atv.add(sample, token_drift(block_input, block_output), modality_ids)

    def end_prescan(self, index: int) -> None:
        self.atv.finish_block(index)

    def observe(self, index, sample, block_input, block_output, taps: LinearTaps, modality_ids, kwargs) -> None:
        if self.atv is not None:
            kept = self.atv.kept(sample)  # one selection per block, shared by its linears
            for rel, x in taps.inputs.items():
                self._norms.add(rel, x[kept.to(x.device)])
            return
        if self.amia is None or getattr(self._block, "self_attn", None) is None:
            # no attention to rank tokens by (e.g. an EAS block that skips it): all tokens
            for rel, x in taps.inputs.items():
                self._norms.add(rel, x)
            return
        keys = _tapped_keys(self._block, taps)
        with taps.paused():  # the row calls q/k_proj, which must not replace the kept inputs
            attention = last_token_attention(
                self._block, block_input, kwargs["position_embeddings"], kwargs.get("attention_mask"), keys
            )
        cfg = self.amia
        if cfg.scope == "block":
            features = (block_output if cfg.features == "output" else block_input)[0]
            chosen = select_tokens(features, attention, modality_ids, cfg)
            for rel, x in taps.inputs.items():
                self._norms.add(rel, x[chosen])
                self.selection.add(index, chosen.numel(), x.shape[0])
            return
        cache: dict[int, torch.Tensor] = {}  # q/k/v (and gate/up) share one input tensor
        for rel, x in taps.inputs.items():
            features = taps.outputs[rel] if cfg.features == "output" else x
            key = features.data_ptr()
            if key not in cache:
                cache[key] = select_tokens(features, attention, modality_ids, cfg)
            chosen = cache[key]
            self._norms.add(rel, x[chosen])
            self.selection.add(index, chosen.numel(), x.shape[0])

    def end_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        for rel, linear in linears.items():
            name = linear_name(self.prefix, index, rel)
            target = self.pattern.ratio if self.pattern.is_nm else self.sparsity[name]
            score = wanda_score(linear.weight, self._norms.norm(rel))
            mask = mask_for_pattern(score, self.pattern, target, self.row_rounding)
            linear.weight.data.masked_fill_(mask.to(linear.weight.device), 0)
            zeros = int((linear.weight == 0).sum())
            self.results.append(LinearResult(name, tuple(linear.weight.shape), target, zeros))
        self._block = None
