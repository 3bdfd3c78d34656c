"""Magnitude pruning: score |W| (absolute value), no calibration data."""

from __future__ import annotations

import torch
from torch import nn

from mmprune.prune.allocation.das import linear_name
from mmprune.prune.driver import block_linears
from mmprune.prune.masks import matrix_mask, nm_mask, unstructured_row_mask
from mmprune.prune.methods.wanda import LinearResult
from mmprune.place.offload import materialized
from mmprune.prune.sparsity import SparsityPattern


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: SparsityPattern, group: str = "matrix") -> torch.Tensor:
    """Exactly floor(s * numel) smallest |w| of the matrix (group `matrix`, the Wanda repository's
    baseline), or per output row (group `row`); N:M per group of M inputs."""
    score = weight.detach().float().abs()
    if pattern.is_nm:
        return nm_mask(score, pattern.n, pattern.m)
    if group == "row":
        return unstructured_row_mask(score, sparsity)
    return matrix_mask(score, sparsity)


@torch.no_grad()
def magnitude_prune(blocks: nn.ModuleList, prefix: str, pattern: SparsityPattern, plan: dict[str, float],
                    group: str = "matrix", device="cpu") -> list[LinearResult]:
    """In place where each block is; a block accelerate offloaded is loaded onto `device`, pruned
    and written back to its store."""
    results = []
    for index, block in enumerate(blocks):
        with materialized(block, device):
            for rel, linear in block_linears(block).items():
                name = linear_name(prefix, index, rel)
                target = pattern.ratio if pattern.is_nm else plan[name]
                linear.weight.data.masked_fill_(magnitude_mask(linear.weight, target, pattern, group), 0)
                results.append(LinearResult(name, tuple(linear.weight.shape), target, int((linear.weight == 0).sum())))
    return results
