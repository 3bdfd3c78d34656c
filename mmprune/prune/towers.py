"""Encoder towers (vision, audio) pruned with Wanda at a uniform ratio, through the same capture
and driver as the decoder: the model side only says how to run the tower on a sample."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import nn

from mmprune.prune.calibration import capture_block_inputs
from mmprune.prune.driver import sweep
from mmprune.prune.methods.wanda import WandaPruner
from mmprune.prune.sparsity import SparsityPattern


def prune_tower_wanda(layers: nn.ModuleList, prefix: str, run_tower: Callable[[Any], None], samples: Iterable,
                      ratio: float, device: str, store_device: str, total: int | None, label: str) -> dict:
    """Prune every linear of the tower's layers at `ratio` (all tokens, per-row groups).
    `run_tower(sample)` runs the tower on one sample (several tiles or frames form one batch)."""
    store = capture_block_inputs(layers[0], run_tower, samples, modality_ids_of=None,
                                 store_device=store_device, total=total)
    names = [f"{prefix}.{i}.{rel}" for i, layer in enumerate(layers)
             for rel, m in layer.named_modules() if isinstance(m, nn.Linear)]
    pruner = WandaPruner(prefix, SparsityPattern(), {n: ratio for n in names})
    sweep(layers, store, pruner, device, desc=f"prune {label} (wanda)")
    zeros = sum(r.zeros for r in pruner.results)
    weights = sum(r.shape[0] * r.shape[1] for r in pruner.results)
    return {label: {"method": "wanda", "target_sparsity": ratio, "achieved_sparsity": zeros / weights,
                    "pruned_linears": len(pruner.results), "calibration_samples": len(store)}}
