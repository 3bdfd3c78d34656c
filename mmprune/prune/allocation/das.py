"""DAS (Diversity-Aware Sparsity): layer-wise sparsity from the diversity of multimodal outputs.

A dense sweep over the calibration set scores each group (one linear, or one decoder block) by
the summed intra/inter-modality diversity of its outputs; an allocator turns the scores into
per-group sparsity with the global target kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from mmprune.prune.allocation.rules import allocate
from mmprune.prune.diversity import DiversityAccumulator, diversity_terms, term_name
from mmprune.prune.driver import LinearTaps


@dataclass(frozen=True)
class DASConfig:
    similarity_mode: str = "positive"  # "positive" (public code) or "mean" (paper text)
    granularity: str = "linear"  # "linear" (public code) or "block" (paper wording)
    allocation: str = "waterfill"  # "waterfill" (public code) or "inverse" (paper text)
    chunk_size: int = 1024


def block_name(prefix: str, index: int) -> str:
    return f"{prefix}.{index}"


def linear_name(prefix: str, index: int, rel: str) -> str:
    return f"{prefix}.{index}.{rel}"


class DiversitySweep:
    """Dense-sweep visitor: accumulates diversity terms per group, changes nothing."""

    modifies_block = False

    def __init__(self, prefix: str, cfg: DASConfig):
        self.prefix = prefix
        self.cfg = cfg
        self.keep_outputs = cfg.granularity == "linear"
        self.accumulator = DiversityAccumulator()
        self.groups: dict[str, list[str]] = {}  # group -> linear names
        self.sizes: dict[str, int] = {}  # linear name -> parameter count

    def begin_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        names = [linear_name(self.prefix, index, rel) for rel in linears]
        for name, linear in zip(names, linears.values()):
            self.sizes[name] = linear.weight.numel()
        if self.cfg.granularity == "block":
            self.groups[block_name(self.prefix, index)] = names
        else:
            self.groups.update({name: [name] for name in names})

    def observe(self, index, sample, block_input, block_output, taps: LinearTaps, modality_ids, kwargs) -> None:
        mode, chunk = self.cfg.similarity_mode, self.cfg.chunk_size
        if self.cfg.granularity == "block":
            terms = diversity_terms(block_output[0], modality_ids, mode, chunk)
            self.accumulator.add(block_name(self.prefix, index), terms)
            return
        for rel, z in taps.outputs.items():
            self.accumulator.add(linear_name(self.prefix, index, rel), diversity_terms(z, modality_ids, mode, chunk))

    def end_block(self, index, block, linears) -> None:
        pass


@dataclass
class DASResult:
    sparsity: dict[str, float]  # linear name -> sparsity
    group_scores: dict[str, float]
    group_terms: dict[str, dict[str, float]] = field(default_factory=dict)
    group_sparsity: dict[str, float] = field(default_factory=dict)


def das_allocation(sweep: DiversitySweep, cfg: DASConfig, target: float, cap: float,
                   modality_names: dict[int, str]) -> DASResult:
    groups = list(sweep.groups)
    sizes = [sum(sweep.sizes[n] for n in sweep.groups[g]) for g in groups]
    scores = [sweep.accumulator.score(g) for g in groups]
    group_sparsity = allocate(cfg.allocation, sizes, scores, target, cap)
    per_linear = {n: s for g, s in zip(groups, group_sparsity) for n in sweep.groups[g]}
    terms = {
        g: {term_name(t, modality_names): v for t, v in sweep.accumulator.term_means(g).items()} for g in groups
    }
    return DASResult(per_linear, dict(zip(groups, scores)), terms, dict(zip(groups, group_sparsity)))

