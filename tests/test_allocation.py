import random

import pytest

from mmprune.prune.allocation.rules import inverse, waterfill, weighted_sparsity
from mmprune.base.errors import UserInputError


def _random_case(seed):
    rng = random.Random(seed)
    sizes = [rng.choice([128 * 128, 128 * 64, 128 * 384, 4096 * 1024]) for _ in range(rng.randint(3, 40))]
    scores = [rng.uniform(0.0, 3.0) for _ in sizes]
    target = rng.choice([0.3, 0.5, 0.6, 0.7, 0.8])
    return sizes, scores, target, min(target + 0.1, 0.99)


@pytest.mark.parametrize("rule", [waterfill, inverse])
@pytest.mark.parametrize("seed", range(12))
def test_hits_target_and_respects_cap(rule, seed):
    sizes, scores, target, cap = _random_case(seed)
    sparsity = rule(sizes, scores, target, cap)
    assert abs(weighted_sparsity(sizes, sparsity) - target) < 1e-3
    assert all(-1e-12 <= s <= cap + 1e-12 for s in sparsity)


def test_waterfill_is_exact_in_weight_counts():
    sizes, scores = [1000, 3000, 500], [1.0, 0.2, 3.0]
    sparsity = waterfill(sizes, scores, 0.5, 0.6)
    kept = [round((1 - s) * n) for s, n in zip(sparsity, sizes)]
    assert sum(kept) == 2250


def test_waterfill_hand_example():
    # floor keep = 40 each (cap 0.6); 20 left handed out 3:1 in absolute counts -> 15 and 5
    assert waterfill([100, 100], [3.0, 1.0], 0.5, 0.6) == pytest.approx([0.45, 0.55])


def test_waterfill_more_important_group_is_denser():
    sparsity = waterfill([100, 100, 100], [0.1, 1.0, 2.0], 0.5, 0.6)
    assert sparsity[0] > sparsity[1] > sparsity[2]


def test_inverse_proportional_when_no_clipping():
    sparsity = inverse([100, 100], [1.0, 1.5], 0.5, 0.9)
    assert sparsity[0] / sparsity[1] == pytest.approx(1.5)
    assert weighted_sparsity([100, 100], sparsity) == pytest.approx(0.5)


def test_equal_scores_give_uniform_for_inverse_and_zero_scores_fall_back():
    assert inverse([10, 30], [2.0, 2.0], 0.4, 0.5) == pytest.approx([0.4, 0.4])
    assert weighted_sparsity([10, 30], waterfill([10, 30], [0.0, 0.0], 0.4, 0.5)) == pytest.approx(0.4, abs=1e-3)


def test_cap_below_target_is_an_error():
    with pytest.raises(UserInputError, match="max_sparsity_per_layer"):
        waterfill([10, 10], [1.0, 1.0], 0.5, 0.4)
