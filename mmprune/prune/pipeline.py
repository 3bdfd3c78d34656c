"""Composition of the core pieces into one pruning run of a decoder, model-agnostic.

Presets (scripts' method names): how sparsity is spread over layers, which weight pruner runs,
and which tokens count in its statistic (Wanda's ||X||, SparseGPT's Hessian). The adapters of each
model only provide the blocks, the captured inputs and the modality names.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from mmprune.prune.selection.amia import AMIAConfig
from mmprune.prune.selection.atv import ATVConfig
from mmprune.prune.selection.token_rules import (AttentionWeightConfig, DriftRule, TokenRule, amia_rule,
                                                  attention_rule)
from mmprune.prune.calibration import CalibrationStore
from mmprune.prune.allocation.rules import allocate
from mmprune.prune.allocation.das import DASConfig, DASResult, DiversitySweep, block_name, das_allocation, linear_name
from mmprune.prune.driver import block_linears, sweep
from mmprune.prune.allocation.ecoflap import ECoFLaPConfig, zeroth_order_importance
from mmprune.base.errors import UserInputError
from mmprune.base.presets import PRESETS  # noqa: F401  (re-exported: the pipeline's public vocabulary)
from mmprune.prune.methods.magnitude import magnitude_prune
from mmprune.prune.methods.sparsegpt import SparseGPTPruner
from mmprune.prune.methods.wanda import LinearResult, SelectionStats, WandaPruner
from mmprune.prune.allocation.owl import OutlierSweep, OWLConfig, owl_plan
from mmprune.prune.sparsity import SparsityPattern
from mmprune.prune.sparsity_dict import load_sparsity_dict, read_sparsity_dict

MAX_DEFAULT_LAYER_SPARSITY = 0.99  # default cap of the layer-wise allocators: no layer pruned whole


def default_amia(pruner: str) -> AMIAConfig:
    """AMIA's settings when none are given: the public code's (tokens ranked on each linear's
    output) for Wanda; for SparseGPT one selection per block and sample, ranked on the block's
    input: every Hessian of the block is taken over the same representative tokens, linears that
    share an input share one Hessian as in SparseGPT, and one selection costs a quarter of one per
    distinct input (the O(N^2 d) graph is most of AMIA's time)."""
    return AMIAConfig(features="input", scope="block") if pruner == "sparsegpt" else AMIAConfig()


@dataclass
class PruneConfig:
    method: str
    sparsity: float
    pattern: SparsityPattern = field(default_factory=SparsityPattern)
    max_sparsity_per_layer: float | None = None  # default: target + 0.1, as the public scripts
    das: DASConfig = field(default_factory=DASConfig)
    amia: AMIAConfig | None = None  # None: default_amia(pruner)
    token_weights: AttentionWeightConfig = field(default_factory=AttentionWeightConfig)
    atv: ATVConfig = field(default_factory=ATVConfig)
    owl: OWLConfig = field(default_factory=OWLConfig)
    ecoflap: ECoFLaPConfig = field(default_factory=ECoFLaPConfig)
    row_rounding: str = "distribute"
    magnitude_group: str = "matrix"
    sparsity_dict_path: str | None = None
    device: str = "cpu"
    layerwise_override: str | None = None  # e.g. OWL allocation with SparseGPT
    pruner_override: str | None = None

    def __post_init__(self) -> None:
        if self.method not in PRESETS:
            raise UserInputError(f"unknown method {self.method!r}; choose one of {', '.join(PRESETS)}")
        self.pattern.check_against_ratio(self.sparsity)
        if self.amia is None:
            self.amia = default_amia(self.pruner)
        if self.tokens == "attention" and self.pruner != "sparsegpt":
            raise UserInputError(f"{self.method}: attention token weights apply to the SparseGPT Hessian only")
        if self.sparsity_dict_path:
            if self.pattern.is_nm:
                raise UserInputError(
                    f"--sparsity_dict cannot be used with --sparsity_type {self.pattern}: an N:M pattern prunes "
                    f"exactly {self.pattern.ratio:g} of every linear, so a per-layer allocation does not apply; "
                    "drop one of the two")
        capped = self.layerwise in ("das", "owl", "ecoflap") and not self.pattern.is_nm
        if self.max_sparsity_per_layer is None:
            self.max_sparsity_per_layer = min(self.sparsity + 0.1, MAX_DEFAULT_LAYER_SPARSITY)
            if capped and self.max_sparsity_per_layer < self.sparsity:
                raise UserInputError(
                    f"target sparsity {self.sparsity:g} is above {MAX_DEFAULT_LAYER_SPARSITY}, the most the "
                    f"{self.layerwise} allocation gives any layer by default (min(T + 0.1, "
                    f"{MAX_DEFAULT_LAYER_SPARSITY})); use a target of at most {MAX_DEFAULT_LAYER_SPARSITY}, or "
                    "allow more with --max_sparsity_per_layer (up to 1)")
        elif capped and self.max_sparsity_per_layer < self.sparsity - 1e-12:
            raise UserInputError(
                f"--max_sparsity_per_layer ({self.max_sparsity_per_layer:g}) is below the target sparsity "
                f"({self.sparsity:g}); no allocation can reach the target. Use at least the target (scripts pass "
                "target + 0.1)")

    def check_sparsity_dict_file(self) -> None:
        """Parse and check --sparsity_dict on its own; entry points call it before loading the model
        (after the output checks), so a broken file never waits for the model."""
        if self.sparsity_dict_path:
            load_sparsity_dict(self.sparsity_dict_path)

    @property
    def layerwise(self) -> str:
        if self.sparsity_dict_path:
            return "file"
        return self.layerwise_override or PRESETS[self.method][0]

    @property
    def pruner(self) -> str:
        return self.pruner_override or PRESETS[self.method][1]

    @property
    def name(self) -> str:
        """The preset, or pruner+allocation for public-flag combinations without a preset."""
        if self.layerwise_override is None and self.pruner_override is None:
            return self.method
        return f"{self.method}+{self.layerwise}"

    @property
    def tokens(self) -> str:
        return PRESETS[self.method][2]

    @property
    def uses_amia(self) -> bool:
        return self.tokens == "amia"

    @property
    def uses_atv(self) -> bool:
        return self.tokens == "atv"

    @property
    def needs_calibration(self) -> bool:
        return self.pruner != "magnitude" or self.layerwise not in ("uniform", "file")


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


@dataclass
class PruneOutcome:
    results: list[LinearResult]
    plan: dict[str, float]  # linear name -> target sparsity
    das: DASResult | None = None
    selection: SelectionStats | None = None
    details: dict = field(default_factory=dict)  # method-specific facts for the report

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


@dataclass
class LanguageHead:
    """What ECoFLaP needs to turn decoder outputs into an LM loss."""

    final_norm: nn.Module
    lm_head: nn.Module


def file_plan(blocks, prefix, cfg: PruneConfig) -> dict[str, float]:
    """The --sparsity_dict allocation mapped onto this decoder, checked against its linears and the
    target (cheap: entry points call it right after loading the model, before any sweep)."""
    sizes = {linear_name(prefix, i, rel): m.weight.numel() for i, b in enumerate(blocks)
             for rel, m in block_linears(b).items()}
    return read_sparsity_dict(cfg.sparsity_dict_path, list(sizes), sizes, cfg.sparsity)


def plan_sparsity(blocks, prefix, store, cfg: PruneConfig, modality_names, timer, head: LanguageHead | None,
                  dense_sweeps: dict | None = None):
    """Per-linear target sparsity (allocation sweeps run on the dense model) and report details.

    The sweeps (DAS diversity, OWL outlier ratios, ECoFLaP importance) read only the dense weights
    and the calibration inputs, never the target: a caller that prunes the same dense model with the
    same inputs at several targets (the quality grid) passes one `dense_sweeps` dict for all of them
    and each sweep runs once. It must start a new dict when the weights or the inputs change."""

    def measured(key, compute):
        if dense_sweeps is None:
            return compute()
        if key not in dense_sweeps:
            dense_sweeps[key] = compute()
        return dense_sweeps[key]

    names = decoder_linear_names(blocks, prefix)
    details: dict = {}
    das_result = None
    layerwise = cfg.layerwise
    if cfg.pattern.is_nm:
        return {n: cfg.pattern.ratio for n in names}, None, details  # N:M fixes the ratio
    if layerwise == "file":
        return file_plan(blocks, prefix, cfg), None, details
    if layerwise == "uniform":
        return {n: cfg.sparsity for n in names}, None, details
    if layerwise == "das":
        def diversity_sweep():
            diversity = DiversitySweep(prefix, cfg.das)
            sweep(blocks, store.clone(), diversity, cfg.device, desc="DAS dense sweep")
            return diversity

        with timer.phase("das_dense_sweep"):
            diversity = measured(("das", prefix, cfg.das), diversity_sweep)
            das_result = das_allocation(diversity, cfg.das, cfg.sparsity, cfg.max_sparsity_per_layer, modality_names)
        return das_result.sparsity, das_result, details
    if layerwise == "owl":
        def outlier_sweep():
            outliers = OutlierSweep(cfg.owl)
            sweep(blocks, store.clone(), outliers, cfg.device, desc="OWL outlier sweep")
            return outliers

        with timer.phase("owl_dense_sweep"):
            outliers = measured(("owl", cfg.owl), outlier_sweep)
            plan, per_block = owl_plan(outliers, blocks, prefix, cfg.sparsity, cfg.max_sparsity_per_layer)
        details["owl"] = {"outlier_ratio_percent": outliers.ratios, "block_sparsity": per_block,
                          "M": cfg.owl.outlier_multiple, "lambda": cfg.owl.spread}
        return plan, None, details
    if layerwise == "ecoflap":
        if head is None:
            raise UserInputError("ECoFLaP needs the model's final norm and LM head; this model side gives none")
        with timer.phase("ecoflap_zeroth_order"):
            importance, counts = measured(("ecoflap", prefix, cfg.ecoflap), lambda: zeroth_order_importance(
                blocks, prefix, store.clone(), head.final_norm, head.lm_head, cfg.ecoflap, cfg.device))
        groups = {block_name(prefix, i): [linear_name(prefix, i, rel) for rel in block_linears(b)]
                  for i, b in enumerate(blocks)}
        sizes = {linear_name(prefix, i, rel): m.weight.numel() for i, b in enumerate(blocks)
                 for rel, m in block_linears(b).items()}
        group_names = list(groups)
        scores = [sum(importance[n] for n in groups[g]) for g in group_names]
        group_sparsity = allocate("waterfill", [sum(sizes[n] for n in groups[g]) for g in group_names], scores,
                                  cfg.sparsity, cfg.max_sparsity_per_layer)
        details["ecoflap"] = {"epsilon": cfg.ecoflap.epsilon, "linear_importance": importance,
                              "block_scores": dict(zip(group_names, scores)),
                              "block_sparsity": dict(zip(group_names, group_sparsity)), **counts}
        return {n: s for g, s in zip(group_names, group_sparsity) for n in groups[g]}, None, details
    raise UserInputError(f"unknown layer-wise allocation {layerwise!r}")


def token_rule(cfg: PruneConfig, modality_names: dict[int, str] | None = None) -> TokenRule | None:
    """The preset's token rule for SparseGPT's Hessian (None: every token, weight 1)."""
    if cfg.tokens == "amia":
        return amia_rule(cfg.amia)
    if cfg.tokens == "attention":
        return attention_rule(cfg.token_weights)
    if cfg.tokens == "atv":
        return DriftRule(cfg.atv, modality_names or {})
    return None


def make_pruner(cfg: PruneConfig, prefix: str, plan: dict[str, float], modality_names: dict[int, str] | None = None):
    """The block visitor that prunes with the preset's pruner and tokens, to `plan`."""
    if cfg.pruner == "sparsegpt":
        return SparseGPTPruner(prefix, cfg.pattern, plan, tokens=token_rule(cfg, modality_names))
    return WandaPruner(prefix, cfg.pattern, plan, cfg.amia if cfg.uses_amia else None, cfg.row_rounding,
                       cfg.atv if cfg.uses_atv else None, modality_names)


def token_report(cfg: PruneConfig, pruner: SparseGPTPruner) -> dict:
    """The token rule's settings, a summary over the decoder and every Hessian's facts."""
    facts = pruner.hessians.values()
    tokens, total = sum(f["tokens"] for f in facts), sum(f["total_tokens"] for f in facts)
    full = [f for f in facts if f["rank"] is not None]
    summary = {
        "hessians": len(facts),
        "token_share": tokens / max(total, 1),
        "rank_deficient": sum(f["rank"] < f["columns"] - f["dead_columns"] for f in full),
        "rank_bound_below_columns": sum(f["rank_bound"] < f["columns"] - f["dead_columns"] for f in facts),
        "min_rank_fraction": min((f["rank"] / max(f["columns"] - f["dead_columns"], 1) for f in full), default=None),
        "raised_damping": sum(f["damping"] != pruner.percdamp for f in facts),
        "dead_columns": sum(f["dead_columns"] for f in facts),
        "unseen_columns": sum(f["unseen_columns"] for f in facts),
    }
    settings: dict = {"rule": pruner.tokens.name, "kind": pruner.tokens.kind}
    if cfg.tokens == "amia":
        settings.update(features=cfg.amia.features, scope=cfg.amia.scope, knn=cfg.amia.knn,
                        mmd_scale=cfg.amia.mmd_scale)
    elif cfg.tokens == "atv":
        settings.update(alpha=cfg.atv.alpha, modalities=cfg.atv.grouping)  # per block: details["atv"]
    else:
        shares = [f["effective_token_share"] for f in facts if "effective_token_share" in f]
        summary["effective_token_share"] = sum(shares) / len(shares) if shares else None
        settings.update(floor=cfg.token_weights.floor, cap=cfg.token_weights.cap)
    return {**settings, "summary": summary, "per_hessian": dict(pruner.hessians)}


def prune_decoder(
    blocks: nn.ModuleList,
    prefix: str,
    store: CalibrationStore | None,
    cfg: PruneConfig,
    modality_names: dict[int, str],
    timer: PhaseTimer,
    head: LanguageHead | None = None,
    dense_sweeps: dict | None = None,
) -> PruneOutcome:
    """Plan per-linear sparsity, then prune block by block; `store` is consumed. `dense_sweeps`:
    see plan_sparsity."""
    check_pattern_fits(blocks, prefix, cfg.pattern)
    plan, das_result, details = plan_sparsity(blocks, prefix, store, cfg, modality_names, timer, head, dense_sweeps)
    if cfg.pruner == "magnitude":
        with timer.phase("prune"):
            results = magnitude_prune(blocks, prefix, cfg.pattern, plan, cfg.magnitude_group, cfg.device)
        return PruneOutcome(results, plan, das_result, None, details)
    pruner = make_pruner(cfg, prefix, plan, modality_names)
    with timer.phase("prune_sweep"):
        sweep(blocks, store, pruner, cfg.device, desc=f"prune ({cfg.method})")
    if cfg.uses_atv:  # atv (Wanda) and atv-obs (SparseGPT) share the rule and its report
        details["atv"] = {"alpha": cfg.atv.alpha, "modalities": cfg.atv.grouping,
                          "per_block": {str(i): b for i, b in pruner.tokens.drift.report.items()}}
    if cfg.pruner == "sparsegpt":
        details["sparsegpt"] = {"blocksize": pruner.blocksize, "percdamp": pruner.percdamp,
                                "raised_damping": pruner.damping, "reconstruction_loss": pruner.losses}
        if pruner.tokens is not None:
            details["sparsegpt"]["tokens"] = token_report(cfg, pruner)
        return PruneOutcome(pruner.results, plan, das_result, None, details)
    return PruneOutcome(pruner.results, plan, das_result, pruner.selection if cfg.uses_amia else None, details)
