"""Wanda pruning (|W| * ||X||, per-row groups or N:M), with pluggable per-linear sparsity (uniform,
DAS, OWL, ...) and pluggable tokens in ||X|| (all tokens, AMIA's representative set, or ATV's
drift selection)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mmprune.prune.selection.amia import AMIAConfig
from mmprune.prune.selection.atv import ATVConfig
from mmprune.prune.selection.token_rules import DriftRule, amia_rule
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
    """How many tokens the token rule kept, per block, summed over samples and linears."""

    selected: dict[int, int] = field(default_factory=dict)
    total: dict[int, int] = field(default_factory=dict)

    def add(self, block: int, selected: int, total: int) -> None:
        self.selected[block] = self.selected.get(block, 0) + selected
        self.total[block] = self.total.get(block, 0) + total

    def fractions(self) -> dict[int, float]:
        return {b: self.selected[b] / self.total[b] for b in self.selected}


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
        if atv is not None and amia is not None:
            raise ValueError("AMIA and ATV are two token rules; give one")
        # the selection paths SparseGPT shares (token_rules)
        self.tokens = amia_rule(amia) if amia is not None else None
        if atv is not None:
            self.tokens = DriftRule(atv, modality_names or {})
        self.atv = self.tokens.drift if atv is not None else None  # ATV's per-block report
        self.prescans = atv is not None  # the driver runs prescan() over every sample first
        self.keep_outputs = self.tokens is not None and self.tokens.keep_outputs
        self.results: list[LinearResult] = []
        self.selection = SelectionStats()
        self._norms = InputNorms()
        self._block: nn.Module | None = None

    def begin_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        self._norms = InputNorms()
        self._block = block
        if self.tokens is not None:
            self.tokens.begin_block(index)

    def prescan(self, index, sample, block_input, block_output, modality_ids) -> None:
        self.tokens.prescan(index, sample, block_input, block_output, modality_ids)

    def end_prescan(self, index: int) -> None:
        self.tokens.end_prescan(index)

    def observe(self, index, sample, block_input, block_output, taps: LinearTaps, modality_ids, kwargs) -> None:
        chosen = None
        if self.tokens is not None:
            chosen = self.tokens.choose(index, sample, self._block, block_input, block_output, taps, modality_ids,
                                        kwargs)
        for rel, x in taps.inputs.items():
            if chosen is None:  # no token rule, or no attention to rank tokens by: all tokens
                self._norms.add(rel, x)
                continue
            self._norms.add(rel, x[chosen[rel]])
            self.selection.add(index, chosen[rel].numel(), x.shape[0])

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
