import itertools
import math

import pytest
import torch

from mmprune.prune.diversity import DiversityAccumulator, diversity_terms, similarity_terms


def slow_terms(features, modality_ids, mode):
    """Obvious pairwise version: loops over token pairs."""
    unit = [f / f.norm() for f in features.double()]
    ids = modality_ids.tolist()
    out = {}
    for m in sorted(set(ids)):
        members = [i for i, x in enumerate(ids) if x == m]
        pairs = [float(unit[a] @ unit[b]) for a, b in itertools.combinations(members, 2)]
        if len(members) >= 2:
            kept = [p for p in pairs if p > 0] if mode == "positive" else pairs
            out[(m, m)] = sum(kept) / len(kept) if kept else 0.0
        for m2 in sorted(set(ids)):
            if m2 > m:
                others = [i for i, x in enumerate(ids) if x == m2]
                vals = [float(unit[a] @ unit[b]) for a in members for b in others]
                out[(m, m2)] = sum(vals) / len(vals)
    return out


@pytest.mark.parametrize("mode", ["positive", "mean"])
@pytest.mark.parametrize("chunk", [3, 1024])
def test_matches_slow_pairwise(mode, chunk):
    torch.manual_seed(0)
    features = torch.randn(37, 16)
    ids = torch.tensor([0] * 10 + [1] * 20 + [2] * 7)
    perm = torch.randperm(37)  # modalities interleaved, as image tokens sit inside the text
    fast = similarity_terms(features, ids[perm], mode, chunk_size=chunk)
    slow = slow_terms(features, ids[perm], mode)
    assert fast.keys() == slow.keys() and len(fast) == 6
    for key in fast:
        assert fast[key] == pytest.approx(slow[key], abs=1e-5)


def test_precomputed_cosine_gives_same_positive_terms():
    torch.manual_seed(3)
    f = torch.randn(20, 8)
    ids = torch.tensor([0] * 8 + [1] * 12)
    unit = f / f.norm(dim=1, keepdim=True)
    assert similarity_terms(f, ids, "positive", cosine=unit @ unit.T) == pytest.approx(similarity_terms(f, ids, "positive"))


@pytest.mark.parametrize("mode", ["positive", "mean"])
def test_text_only_sample_gives_only_text_term_and_no_nan(mode):
    terms = diversity_terms(torch.randn(5, 8), torch.zeros(5, dtype=torch.int8), mode)
    assert list(terms) == [(0, 0)]
    assert all(math.isfinite(v) for v in terms.values())


def test_single_token_modality_has_no_intra_term():
    terms = diversity_terms(torch.randn(4, 8), torch.tensor([0, 0, 0, 1]), "mean")
    assert set(terms) == {(0, 0), (0, 1)}


def test_identical_tokens_have_zero_diversity():
    f = torch.ones(6, 4)
    terms = diversity_terms(f, torch.tensor([0, 0, 0, 1, 1, 1]), "mean")
    assert all(abs(v) < 1e-6 for v in terms.values())


def test_accumulator_averages_each_term_where_present():
    acc = DiversityAccumulator()
    acc.add("g", {(0, 0): 0.2, (0, 1): 0.4, (1, 1): 0.6})
    acc.add("g", {(0, 0): 0.4})  # text-only sample
    assert acc.term_means("g") == pytest.approx({(0, 0): 0.3, (0, 1): 0.4, (1, 1): 0.6})
    assert acc.score("g") == pytest.approx(1.3)
