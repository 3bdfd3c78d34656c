"""Layer-wise sparsity allocation: from group sizes and importance scores to per-group sparsity.

Shared by DAS (TAMP) and ECoFLaP. A group is one linear or one decoder block; its size is its
parameter count. Both rules keep the parameter-weighted mean sparsity at the global target T.
"""

from __future__ import annotations

import math
from typing import Sequence

from mmprune.base.errors import UserInputError


def _check(sizes: Sequence[int], scores: Sequence[float], target: float, cap: float) -> None:
    if len(sizes) != len(scores):
        raise ValueError("sizes and scores differ in length")
    if not 0 <= target < 1:
        raise UserInputError(f"target sparsity must be in [0, 1), got {target}")
    if cap < target - 1e-12:
        raise UserInputError(
            f"--max_sparsity_per_layer ({cap}) is below the target sparsity ({target}); no "
            "allocation can reach the target. Use at least the target (scripts pass target + 0.1)"
        )
    if any(not math.isfinite(s) or s < 0 for s in scores):
        raise ValueError(f"importance scores must be finite and non-negative, got {list(scores)}")


def uniform(sizes: Sequence[int], target: float) -> list[float]:
    return [float(target)] * len(sizes)


def waterfill(sizes: Sequence[int], scores: Sequence[float], target: float, cap: float) -> list[float]:
    """Water-filling (public TAMP/ECoFLaP code): every group starts at the cap, the remaining keep
    budget is handed out in proportion to the score, in absolute weight counts, until it is spent.
    Exact in integer weight counts: sum(keep) == round((1 - T) * sum(sizes))."""
    _check(sizes, scores, target, min(cap, 1.0))
    cap = min(cap, 1.0)
    total_keep = int(round((1.0 - target) * sum(sizes)))
    keep = [math.ceil(n * (1.0 - cap) - 1e-9) for n in sizes]
    floor = list(keep)
    share = [float(s) for s in scores]
    if sum(share) <= 0:
        share = [1.0] * len(sizes)  # no information: spread the budget evenly in counts
    while sum(keep) < total_keep:
        remaining = total_keep - sum(keep)
        active = sum(share)
        if active <= 0:
            break
        added = 0
        for g, n in enumerate(sizes):
            if share[g] <= 0:
                continue
            grant = min(math.ceil(share[g] / active * remaining), n - keep[g])
            keep[g] += grant
            added += grant
            if keep[g] >= n:
                share[g] = 0.0
        if added == 0:
            break
    # Hand out what is left one weight at a time (only reached when every share is exhausted).
    g = 0
    while sum(keep) < total_keep and g < len(sizes):
        room = min(sizes[g] - keep[g], total_keep - sum(keep))
        keep[g] += room
        g += 1
    # Trim the overshoot of the ceil() grants from the least important groups above their floor.
    overshoot = sum(keep) - total_keep
    order = sorted(range(len(sizes)), key=lambda i: (scores[i], i))
    while overshoot > 0:
        progressed = False
        for g in order:
            if overshoot and keep[g] > floor[g]:
                keep[g] -= 1
                overshoot -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("water-filling could not meet the target; this is a bug")
    return [1.0 - k / n for k, n in zip(keep, sizes)]


def inverse(sizes: Sequence[int], scores: Sequence[float], target: float, cap: float) -> list[float]:
    """Sparsity proportional to 1/score (paper text), scaled so the parameter-weighted mean is T,
    clipped to [0, cap]; what the clipped groups cannot take is spread over the others."""
    _check(sizes, scores, target, cap)
    cap = min(cap, 1.0)
    count = len(sizes)
    if not any(s > 0 for s in scores):
        return uniform(sizes, target)
    weight = [1.0 / s if s > 0 else math.inf for s in scores]
    at_cap = [w == math.inf for w in weight]
    budget_total = target * sum(sizes)
    while True:
        budget = budget_total - sum(n * cap for n, c in zip(sizes, at_cap) if c)
        free = [g for g in range(count) if not at_cap[g]]
        if not free:
            break
        denominator = sum(sizes[g] * weight[g] for g in free)
        scale = budget / denominator if denominator > 0 else 0.0
        over = [g for g in free if scale * weight[g] > cap]
        if not over:
            sparsity = [cap if at_cap[g] else scale * weight[g] for g in range(count)]
            return sparsity
        for g in over:
            at_cap[g] = True
    return [cap] * count


ALLOCATORS = {"waterfill": waterfill, "inverse": inverse}


def allocate(rule: str, sizes: Sequence[int], scores: Sequence[float], target: float, cap: float) -> list[float]:
    if rule not in ALLOCATORS:
        raise UserInputError(f"unknown allocation rule {rule!r}; choose one of {sorted(ALLOCATORS)}")
    return ALLOCATORS[rule](sizes, scores, target, cap)


def weighted_sparsity(sizes: Sequence[int], sparsity: Sequence[float]) -> float:
    return sum(n * s for n, s in zip(sizes, sparsity)) / sum(sizes)
