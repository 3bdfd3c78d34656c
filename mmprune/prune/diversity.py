"""DAS diversity of multimodal token features: per-modality intra and inter cosine similarity.

Terms are keyed by modality id pairs (m, m') with m <= m'; (m, m) is intra-modality.
A term whose modality is absent (or has fewer than 2 tokens, for intra) is simply not returned,
so a sample without an image never produces NaN.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

import torch

MODES = ("positive", "mean")
Term = tuple[int, int]


def normalize_rows(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in float32 (a zero row stays zero)."""
    features = features.reshape(-1, features.shape[-1]).float()
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _positive_upper_mean(unit: torch.Tensor, chunk_size: int) -> float:
    """Mean of the strictly positive entries of the strict upper triangle of unit @ unit.T,
    computed in row chunks so only chunk_size x n similarities exist at once."""
    n = unit.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=unit.device)
    count = 0
    columns = torch.arange(n, device=unit.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = unit[start:stop] @ unit.T
        rows = torch.arange(start, stop, device=unit.device).unsqueeze(1)
        keep = (columns.unsqueeze(0) > rows) & (block > 0)
        total += block[keep].sum(dtype=torch.float64)
        count += int(keep.sum())
    return float(total / count) if count else 0.0


def similarity_terms(
    features: torch.Tensor,
    modality_ids: torch.Tensor,
    mode: str = "positive",
    chunk_size: int = 1024,
    cosine: torch.Tensor | None = None,
) -> dict[Term, float]:
    """Cosine-similarity terms of one sample's token features (N x d) grouped by modality.

    `mean`: plain means over pairs, exact in O(N d) via per-modality sums of unit vectors.
    `positive`: intra terms average only the strictly positive upper-triangle entries (public
    code), which needs the pairwise matrix: chunked O(N^2 d). Inter terms are plain means in both.
    `cosine`, if given, is the already computed N x N matrix of the normalised features.
    """
    if mode not in MODES:
        raise ValueError(f"unknown similarity mode {mode!r}; choose one of {MODES}")
    features = features.reshape(-1, features.shape[-1]).float()
    modality_ids = modality_ids.reshape(-1).to(features.device)
    present = sorted(int(m) for m in torch.unique(modality_ids))
    index = {m: (modality_ids == m).nonzero().squeeze(1) for m in present}
    # per-modality sums of the unit rows as one (M x N) @ (N x d) product with 1/|f| folded into
    # the weights: one pass over the features, no normalised copy (the `mean` mode's whole cost)
    lengths = torch.linalg.vector_norm(features, dim=1)
    inverse = 1.0 / lengths.clamp_min(1e-12)
    onehot = (modality_ids.unsqueeze(0) == torch.tensor(present, device=features.device).unsqueeze(1)).float()
    sum_rows = ((onehot * inverse) @ features).double()
    norm_rows = onehot.double() @ (lengths * inverse).double().pow(2)  # 1 per token, 0 for a zero row
    sums = {m: sum_rows[i] for i, m in enumerate(present)}
    norms = {m: norm_rows[i] for i, m in enumerate(present)}
    unit = normalize_rows(features) if mode == "positive" and cosine is None else None
    terms: dict[Term, float] = {}
    for i, m in enumerate(present):
        n = index[m].numel()
        if n >= 2:
            if mode == "mean":
                terms[(m, m)] = float((sums[m] @ sums[m] - norms[m]) / (n * (n - 1)))
            elif cosine is not None:
                upper = cosine[index[m]][:, index[m]].triu(diagonal=1)  # zeros elsewhere add nothing
                count = int((upper > 0).sum())
                total = upper.clamp_min(0).sum(dtype=torch.float64)
                terms[(m, m)] = float(total / count) if count else 0.0
            else:
                terms[(m, m)] = _positive_upper_mean(unit[index[m]], chunk_size)
        for m2 in present[i + 1:]:
            terms[(m, m2)] = float(sums[m] @ sums[m2] / (n * index[m2].numel()))
    return terms


def diversity_terms(features, modality_ids, mode="positive", chunk_size=1024, cosine=None) -> dict[Term, float]:
    """1 - similarity for every term present in the sample."""
    sims = similarity_terms(features, modality_ids, mode, chunk_size, cosine)
    return {term: 1.0 - value for term, value in sims.items()}


def term_name(term: Term, names: Mapping[int, str]) -> str:
    a, b = (names.get(t, str(t)) for t in term)
    return f"{a}-{b}"


class DiversityAccumulator:
    """Averages every term over the samples where it exists; a group's score is the sum of its
    averaged terms."""

    def __init__(self) -> None:
        self._sum: dict[str, dict[Term, float]] = defaultdict(lambda: defaultdict(float))
        self._count: dict[str, dict[Term, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, group: str, terms: Mapping[Term, float]) -> None:
        for term, value in terms.items():
            self._sum[group][term] += value
            self._count[group][term] += 1

    def groups(self) -> Iterable[str]:
        return self._sum.keys()

    def term_means(self, group: str) -> dict[Term, float]:
        return {t: self._sum[group][t] / self._count[group][t] for t in sorted(self._sum[group])}

    def score(self, group: str) -> float:
        return sum(self.term_means(group).values())
