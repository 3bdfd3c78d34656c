"""OWL (Outlier Weighed Layerwise sparsity, Yin et al. 2024): blocks with more outliers in their
Wanda scores are pruned *less*. s_l = S - (D~_l - mean D~), D~ scaled to [0, 2 lambda], kept
within [0, cap] (owl_sparsity)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmprune.prune.allocation.das import linear_name
from mmprune.prune.driver import LinearTaps
from mmprune.prune.stats import InputNorms, wanda_score


@dataclass(frozen=True)
class OWLConfig:
    outlier_multiple: float = 5.0  # M: a score above M * mean is an outlier
    spread: float = 0.08  # lambda: sparsity moves within [S - lambda, S + lambda]


def outlier_ratio(scores: list[torch.Tensor], multiple: float) -> float:
    """Percentage of entries above `multiple` times the mean, over all given score matrices."""
    total = sum(s.numel() for s in scores)
    mean = sum(float(s.sum(dtype=torch.float64)) for s in scores) / total
    above = sum(int((s > multiple * mean).sum()) for s in scores)
    return 100.0 * above / total


def owl_sparsity(ratios: list[float], target: float, spread: float, cap: float = 0.99) -> list[float]:
    """Per-block sparsity from outlier ratios; the mean stays at the target.

    Every block stays within [0, cap] (cap: --max_sparsity_per_layer, default min(T + 0.1, 0.99)):
    where s_l = T - (D~_l - mean D~) would leave that range (T near 0 or 1, or a large lambda),
    all deviations from T are scaled down by one common factor, so the ranking of the blocks and
    the mean T are kept and no block is pruned whole or below zero."""
    low, high = min(ratios), max(ratios)
    if high - low <= 0:
        return [target] * len(ratios)
    scaled = [2 * spread * (d - low) / (high - low) for d in ratios]
    mean = sum(scaled) / len(scaled)
    deviation = [d - mean for d in scaled]  # s_l = T - deviation_l
    factor = 1.0
    for dev in deviation:
        if dev > 0:
            factor = min(factor, target / dev)
        elif dev < 0:
            factor = min(factor, max(cap - target, 0.0) / -dev)
    return [min(max(target - factor * dev, 0.0), cap) for dev in deviation]


class OutlierSweep:
    """Dense-sweep visitor: Wanda scores (all tokens) of every linear of a block -> outlier ratio."""

    keep_outputs = False
    modifies_block = False

    def __init__(self, cfg: OWLConfig):
        self.cfg = cfg
        self.ratios: dict[int, float] = {}

    def begin_block(self, index, block, linears) -> None:
        self._norms = InputNorms()

    def observe(self, index, sample, block_input, block_output, taps: LinearTaps, modality_ids, kwargs) -> None:
        for rel, x in taps.inputs.items():
            self._norms.add(rel, x)

    def end_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        scores = [wanda_score(linear.weight, self._norms.norm(rel)) for rel, linear in linears.items()]
        self.ratios[index] = outlier_ratio(scores, self.cfg.outlier_multiple)


def owl_plan(sweep: OutlierSweep, blocks, prefix: str, target: float,
             cap: float = 0.99) -> tuple[dict[str, float], dict[int, float]]:
    indices = sorted(sweep.ratios)
    per_block = dict(zip(indices, owl_sparsity([sweep.ratios[i] for i in indices], target, sweep.cfg.spread, cap)))
    plan = {}
    for index, block in enumerate(blocks):
        for rel, module in block.named_modules():
            if isinstance(module, nn.Linear):
                plan[linear_name(prefix, index, rel)] = per_block[index]
    return plan, per_block
