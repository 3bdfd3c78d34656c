"""ECoFLaP's zeroth-order layer importance (Sung et al., ICLR 2024), coarse stage.

For every linear W and calibration sample b: g_W += |L(W + eps z) - L(W - eps z)| / (2 eps), with
z ~ N(0, I) drawn deterministically from (block, linear, sample) and L the sample's LM loss
(answer tokens) in float32. A perturbation of block i cannot change blocks before it, so the loss
is computed from block i's dense inputs onward: exact, and about half the cost of full passes.
Block scores (sum over the block's linears) feed the water-filling allocator (cap T + 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from mmprune.prune.calibration import CalibrationStore
from mmprune.prune.allocation.das import linear_name
from mmprune.prune.driver import block_linears, block_output, on_device
from mmprune.base.errors import UserInputError


@dataclass(frozen=True)
class ECoFLaPConfig:
    epsilon: float = 1e-3
    samples: int | None = None  # calibration samples used for the estimate (None: all)
    seed: int = 0


def lm_loss_from_hidden(final_norm: nn.Module, lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean next-token cross-entropy over labelled positions, in float32 or wider. The norm and the
    LM head run on the labelled positions only (both act per position): with a large vocabulary
    the head over a whole prompt costs as much as several decoder blocks."""
    target = labels[:, 1:].to(hidden.device)
    labelled = target != -100
    logits = lm_head(final_norm(hidden[:, :-1][labelled]))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return float(F.cross_entropy(logits, target[labelled]))


def _perturbation(shape, seed: int, device, dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


@torch.no_grad()
def zeroth_order_importance(
    blocks: nn.ModuleList, prefix: str, store: CalibrationStore, final_norm: nn.Module, lm_head: nn.Module,
    cfg: ECoFLaPConfig, device,
) -> tuple[dict[str, float], dict[str, int]]:
    """Importance per linear and the forward-pass counts spent. `store` is consumed (advanced)."""
    samples = range(min(cfg.samples or len(store), len(store)))
    unlabelled = [j for j in samples if store.labels[j] is None or not bool((store.labels[j] != -100).any())]
    if unlabelled:
        raise UserInputError(f"ECoFLaP needs labelled answer tokens in every calibration sample, but sample(s) "
                             f"{unlabelled[:5]} have none (no assistant answer); use records with answers")
    importance: dict[str, float] = {}
    block_passes = 0
    with on_device(blocks, device), on_device(final_norm, device), on_device(lm_head, device):
        for index, block in enumerate(tqdm(blocks, desc="ECoFLaP zeroth-order", unit="block")):

            def loss_from_here(j: int) -> float:
                nonlocal block_passes
                hidden, kwargs = store.inputs(j, device)
                for later in blocks[index:]:
                    hidden = block_output(later, hidden, kwargs)
                block_passes += len(blocks) - index
                return lm_loss_from_hidden(final_norm, lm_head, hidden, store.labels[j])

            for position, (rel, linear) in enumerate(block_linears(block).items()):
                original = linear.weight.data.clone()
                total = 0.0
                for j in samples:
                    seed = cfg.seed + 1_000_003 * index + 10_007 * position + j
                    step = cfg.epsilon * _perturbation(original.shape, seed, original.device, original.dtype)
                    linear.weight.data = original + step
                    plus = loss_from_here(j)
                    linear.weight.data = original - step
                    minus = loss_from_here(j)
                    linear.weight.data = original  # exact restore from the saved copy
                    total += abs(plus - minus) / (2 * cfg.epsilon)
                importance[linear_name(prefix, index, rel)] = total
            for j in range(len(store)):
                hidden, kwargs = store.inputs(j, device)
                store.hidden[j] = block_output(block, hidden, kwargs).to(store.device)
            block_passes += len(store)
    counts = {"block_forward_passes": block_passes,
              "full_model_equivalent_passes": round(block_passes / len(blocks), 1),
              "perturbed_linears": len(importance), "samples": len(samples)}
    return importance, counts
