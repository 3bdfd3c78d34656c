"""Pruning masks from importance scores. True in a mask means "set this weight to zero".

Ties are broken deterministically: a stable sort keeps the lower index first, so among equal
scores the weight with the lower column (or row) index is pruned first.
"""

from __future__ import annotations

import torch

from mmprune.prune.sparsity import SparsityPattern


def _mask_from_sorted_prefix(order: torch.Tensor, keep_from: torch.Tensor) -> torch.Tensor:
    """Mask the first keep_from[r] entries of each row of a sort order (order: R x C indices)."""
    rows, cols = order.shape
    ranks = torch.arange(cols, device=order.device).expand(rows, cols)
    pruned_sorted = ranks < keep_from.unsqueeze(1)
    mask = torch.zeros_like(pruned_sorted)
    mask.scatter_(1, order, pruned_sorted)
    return mask


def row_prune_counts(score: torch.Tensor, sparsity: float, rounding: str) -> torch.Tensor:
    """How many weights each row loses.

    `floor`: every row loses floor(C * s) (Wanda's rule). `distribute`: the matrix loses exactly
    round(s * R * C) weights, floor or ceil per row; the extra ones go to the rows whose next
    candidate has the lowest score. Both agree whenever C * s is an integer; `distribute` keeps
    the achieved sparsity on target for narrow matrices (C = 128 loses up to 1/128 with floor).
    """
    rows, cols = score.shape
    if rounding == "floor":
        return torch.full((rows,), int(cols * sparsity + 1e-9), dtype=torch.long, device=score.device)
    if rounding != "distribute":
        raise ValueError(f"unknown row rounding {rounding!r}")
    total = int(round(sparsity * rows * cols))
    base, extra = divmod(total, rows)
    counts = torch.full((rows,), base, dtype=torch.long, device=score.device)
    if extra:
        next_candidate = torch.kthvalue(score, base + 1, dim=1).values  # each row's (base+1)-th smallest
        chosen = torch.sort(next_candidate, stable=True).indices[:extra]
        counts[chosen] += 1
    return counts


def lowest_per_row(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask of the counts[r] lowest scores of each row, ties going to the lower column: exactly
    the first counts[r] entries of a stable sort, without sorting (4-5x faster on 8B-sized
    matrices, and no R x C index matrix)."""
    rows, cols = score.shape
    threshold = torch.full((rows,), float("-inf"), dtype=score.dtype, device=score.device)
    for k in torch.unique(counts).tolist():  # distribute gives at most two distinct counts
        if k > 0:
            chosen = (counts == k).nonzero().squeeze(1)
            threshold[chosen] = torch.kthvalue(score[chosen], min(k, cols), dim=1).values
    mask = score < threshold.unsqueeze(1)
    equal = score == threshold.unsqueeze(1)
    need = counts - mask.sum(dim=1)  # how many of the tied entries each row still takes
    crowded = (equal.sum(dim=1) > need).nonzero().squeeze(1)  # rows where not every tie is taken
    if crowded.numel():
        sub = equal[crowded]
        equal[crowded] = sub & (sub.cumsum(dim=1) <= need[crowded].unsqueeze(1))
    return mask | equal


def unstructured_row_mask(score: torch.Tensor, sparsity: float, rounding: str = "distribute") -> torch.Tensor:
    """Per output row, prune the lowest-scoring inputs (Wanda's comparison group)."""
    if sparsity <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    return lowest_per_row(score, row_prune_counts(score, sparsity, rounding))


def unstructured_row_mask_by_sort(score: torch.Tensor, sparsity: float, rounding: str = "distribute") -> torch.Tensor:
    """The obvious version (a full stable sort per row), kept as the reference of the tests."""
    if sparsity <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    order = torch.sort(score, dim=1, stable=True).indices
    return _mask_from_sorted_prefix(order, row_prune_counts(score, sparsity, rounding))


def matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly floor(s * numel) lowest scores of the whole matrix (magnitude's group)."""
    flat = score.reshape(1, -1)
    count = torch.tensor([int(flat.shape[1] * sparsity + 1e-9)], device=score.device)
    order = torch.sort(flat, dim=1, stable=True).indices
    return _mask_from_sorted_prefix(order, count).reshape(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive inputs of each row, prune the n lowest scores."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the input size ({cols}) to be a multiple of M")
    groups = score.reshape(rows * cols // m, m)
    order = torch.sort(groups, dim=1, stable=True).indices
    counts = torch.full((groups.shape[0],), n, dtype=torch.long, device=score.device)
    return _mask_from_sorted_prefix(order, counts).reshape(rows, cols)


def mask_for_pattern(
    score: torch.Tensor, pattern: SparsityPattern, sparsity: float, rounding: str = "distribute"
) -> torch.Tensor:
    if pattern.is_nm:
        return nm_mask(score, pattern.n, pattern.m)
    return unstructured_row_mask(score, sparsity, rounding)


def nm_pattern_holds(weight: torch.Tensor, n: int, m: int) -> bool:
    """Every group of m consecutive inputs of every row holds at least n zeros."""
    rows, cols = weight.shape
    zeros = (weight.reshape(rows, cols // m, m) == 0).sum(dim=-1)
    return bool((zeros >= n).all())
