"""Comparing the discrete decisions (masks, greedy tokens) of two computations of the same float32
scores. Summation order (CPU vector width, BLAS kernels, thread count) moves a score by rounding,
so two scores that tie to within it may be decided either way on another machine: these helpers
accept a differing decision only where the scores were such a near-tie, and say how near."""

from __future__ import annotations

import torch


def decision_units(t: torch.Tensor, group: int, across_rows: bool = False) -> torch.Tensor:
    """One row per decision: `group` consecutive columns of one row (an N:M group, or a whole row
    for per-row top-k), or with `across_rows` a `group`-column block of all rows (one threshold per
    block, as SparseGPT's unstructured mask)."""
    rows, cols = t.shape
    if across_rows:
        return t.reshape(rows, cols // group, group).transpose(0, 1).reshape(cols // group, rows * group)
    return t.reshape(rows * cols // group, group)


def inversion(pruned: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Per decision (row): by how much, relative to itself, the highest pruned score exceeds the
    lowest kept one; 0 where the pruned entries are the lowest scores."""
    top_pruned = scores.masked_fill(~pruned, -torch.inf).amax(1)
    low_kept = scores.masked_fill(pruned, torch.inf).amin(1)
    over = (top_pruned - low_kept).clamp(min=0)
    return torch.where(over > 0, over / top_pruned, 0.0)


def greedy_agreement(got: list[int], expected: list[int], logits: torch.Tensor, tolerance: float) -> int:
    """Greedy tokens of two computations: equal, or parting at a step where the two tokens are the
    reference's (`expected`, `logits`: one row per step) two highest logits, at most `tolerance`
    apart. After that step the two decode from different contexts and nothing is compared.
    Returns the number of leading steps that agree."""
    steps = min(len(got), len(expected))
    differ = (torch.tensor(got[:steps], dtype=torch.long) != torch.tensor(expected[:steps], dtype=torch.long)).nonzero()
    if not len(differ):
        assert len(got) == len(expected), f"{got} vs {expected}"
        return steps
    step = int(differ[0])
    top = logits[step].float().topk(2)
    gap = float(top.values[0] - top.values[1])
    assert sorted(top.indices.tolist()) == sorted([got[step], expected[step]]) and gap <= tolerance, \
        f"step {step}: {got} vs {expected}, top-2 logit gap {gap:.3g} (tolerance {tolerance:g})"
    return step


def argmax_near_ties(logits: torch.Tensor, reference: torch.Tensor, tolerance: float) -> int:
    """Per row, the argmax of `logits` equals that of `reference` (the same positions computed
    another way) except where the reference's two highest logits are at most `tolerance` apart.
    Returns how many rows differ."""
    differ = logits.argmax(-1) != reference.argmax(-1)
    top = reference[differ].float().topk(2, dim=-1)
    gaps = top.values[:, 0] - top.values[:, 1]
    runner_up = bool((logits.argmax(-1)[differ] == top.indices[:, 1]).all())
    assert runner_up and bool((gaps <= tolerance).all()), f"argmax differs at rows " \
        f"{differ.nonzero().flatten().tolist()}, top-2 gaps {gaps.tolist()} (tolerance {tolerance:g})"
    return int(differ.sum())
