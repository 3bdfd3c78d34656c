"""Composition of the core pieces into one pruning run of a decoder, model-agnostic.

Presets (scripts' method names): how sparsity is spread over layers, and which tokens count in
Wanda's ||X||. The adapters of each model only provide the blocks, the captured inputs and the
modality names.
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from mmprune.amia import AMIAConfig
from mmprune.calibration import CalibrationStore
from mmprune.das import DASConfig, DASResult, DiversitySweep, das_allocation, linear_name
from mmprune.driver import block_linears, sweep
from mmprune.errors import UserInputError
from mmprune.methods.wanda import LinearResult, SelectionStats, WandaPruner
from mmprune.sparsity import SparsityPattern
from mmprune.sparsity_dict import read_sparsity_dict

# method -> (layer-wise sparsity, tokens in ||X||)
PRESETS: dict[str, tuple[str, str]] = {
    "wanda": ("uniform", "all"),
    "das": ("das", "all"),
    "amia": ("uniform", "amia"),
    "tamp": ("das", "amia"),
}


@dataclass
class PruneConfig:
    method: str
    sparsity: float
    pattern: SparsityPattern = field(default_factory=SparsityPattern)
    max_sparsity_per_layer: float | None = None  # default: target + 0.1, as the public scripts
    das: DASConfig = field(default_factory=DASConfig)
    amia: AMIAConfig = field(default_factory=AMIAConfig)
    row_rounding: str = "distribute"
    sparsity_dict_path: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in PRESETS:
            raise UserInputError(f"unknown method {self.method!r}; choose one of {', '.join(PRESETS)}")
        self.pattern.check_against_ratio(self.sparsity)
        if self.max_sparsity_per_layer is None:
            self.max_sparsity_per_layer = min(self.sparsity + 0.1, 0.99)

    @property
    def layerwise(self) -> str:
        return "file" if self.sparsity_dict_path else PRESETS[self.method][0]

    @property
    def uses_amia(self) -> bool:
        return PRESETS[self.method][1] == "amia"


class PhaseTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def peak_memory() -> dict[str, float]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"cpu_max_rss_mb": rss_kb / (1024 if sys.platform != "darwin" else 1024 * 1024)}
    if torch.cuda.is_available():
        peak["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


@dataclass
class PruneOutcome:
    results: list[LinearResult]
    plan: dict[str, float]  # linear name -> target sparsity
    das: DASResult | None = None
    selection: SelectionStats | None = None

    @property
    def achieved(self) -> float:
        zeros = sum(r.zeros for r in self.results)
        return zeros / sum(r.shape[0] * r.shape[1] for r in self.results)


def decoder_linear_names(blocks: nn.ModuleList, prefix: str) -> list[str]:
    return [linear_name(prefix, i, rel) for i, block in enumerate(blocks) for rel in block_linears(block)]


def check_pattern_fits(blocks: nn.ModuleList, prefix: str, pattern: SparsityPattern) -> None:
    for i, block in enumerate(blocks):
        for rel, linear in block_linears(block).items():
            pattern.check_divides(linear.in_features, linear_name(prefix, i, rel))


def prune_decoder(
    blocks: nn.ModuleList,
    prefix: str,
    store: CalibrationStore,
    cfg: PruneConfig,
    modality_names: dict[int, str],
    timer: PhaseTimer,
) -> PruneOutcome:
    """Plan per-linear sparsity, then prune block by block; `store` is consumed."""
    names = decoder_linear_names(blocks, prefix)
    check_pattern_fits(blocks, prefix, cfg.pattern)
    das_result = None
    if cfg.pattern.is_nm:
        plan = {n: cfg.pattern.ratio for n in names}  # N:M fixes the ratio; allocators do not apply
    elif cfg.layerwise == "file":
        plan = read_sparsity_dict(cfg.sparsity_dict_path, names)
    elif cfg.layerwise == "das":
        with timer.phase("das_dense_sweep"):
            diversity = DiversitySweep(prefix, cfg.das)
            sweep(blocks, store.clone(), diversity, cfg.device, desc="DAS dense sweep")
            das_result = das_allocation(diversity, cfg.das, cfg.sparsity, cfg.max_sparsity_per_layer, modality_names)
        plan = das_result.sparsity
    else:
        plan = {n: cfg.sparsity for n in names}
    pruner = WandaPruner(prefix, cfg.pattern, plan, cfg.amia if cfg.uses_amia else None, cfg.row_rounding)
    with timer.phase("prune_sweep"):
        sweep(blocks, store, pruner, cfg.device, desc=f"prune ({cfg.method})")
    return PruneOutcome(pruner.results, plan, das_result, pruner.selection if cfg.uses_amia else None)
