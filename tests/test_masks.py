import pytest
import torch

from mmprune.prune.masks import matrix_mask, nm_mask, nm_pattern_holds, unstructured_row_mask
from mmprune.prune.sparsity import SparsityPattern
from mmprune.base.errors import UserInputError


def test_row_mask_hand_checked():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 0.7, 0.1, 0.9]])
    mask = unstructured_row_mask(score, 0.5)
    assert mask.tolist() == [[False, True, False, True], [True, False, True, False]]


def test_row_mask_ties_go_to_lower_index():
    score = torch.ones(2, 4)
    assert unstructured_row_mask(score, 0.5).tolist() == [[True, True, False, False]] * 2


def test_floor_rounding_matches_wanda_rule():
    score = torch.arange(10.0).repeat(3, 1)
    mask = unstructured_row_mask(score, 0.35, rounding="floor")  # floor(3.5) = 3 per row
    assert mask.sum(dim=1).tolist() == [3, 3, 3]
    assert mask[:, :3].all() and not mask[:, 3:].any()


def test_distribute_rounding_hits_exact_count_and_favours_cheap_rows():
    score = torch.tensor([[1.0, 2.0, 9.0, 9.0], [1.0, 2.0, 3.0, 9.0], [1.0, 2.0, 8.0, 9.0]])
    mask = unstructured_row_mask(score, 7 / 12)  # 7 weights: 2 per row plus 1 extra
    assert int(mask.sum()) == 7
    assert mask.sum(dim=1).tolist() == [2, 3, 2]  # row 1 has the cheapest third weight (3.0)


def test_distribute_equals_floor_when_row_count_is_integral():
    torch.manual_seed(0)
    score = torch.rand(16, 64)
    assert torch.equal(unstructured_row_mask(score, 0.5), unstructured_row_mask(score, 0.5, "floor"))


def test_nm_mask_pattern():
    score = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 5.0, 6.0, 7.0]])
    mask = nm_mask(score, 2, 4)
    assert mask.tolist() == [[True, False, True, False, False, True, True, False]]
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    w[nm_mask(w.abs(), 4, 8)] = 0
    assert nm_pattern_holds(w, 4, 8)
    assert float((w == 0).float().mean()) == 0.5


def test_matrix_mask_prunes_smallest_of_whole_matrix():
    score = torch.tensor([[0.1, 5.0], [0.2, 0.3], [7.0, 0.4]])
    mask = matrix_mask(score, 0.5)  # floor(3) smallest: 0.1, 0.2, 0.3
    assert mask.tolist() == [[True, False], [True, True], [False, False]]


@pytest.mark.parametrize("text", ["3:3", "0:4", "2-4", "abc", ""])
def test_bad_patterns(text):
    with pytest.raises(UserInputError):
        SparsityPattern.parse(text)


def test_pattern_ratio_and_divisibility_checks():
    with pytest.raises(UserInputError, match="prunes exactly 0.75"):
        SparsityPattern.parse("3:4").check_against_ratio(0.5)
    with pytest.raises(UserInputError, match="does not divide"):
        SparsityPattern.parse("1:3").check_divides(128, "q_proj")
    SparsityPattern.parse("2:4").check_against_ratio(0.5)


@pytest.mark.parametrize("rounding", ["distribute", "floor"])
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 7 / 12, 0.9, 1.0])
def test_selection_mask_equals_the_stable_sort_prefix(rounding, sparsity):
    """kthvalue + tie handling gives exactly the stable sort's prefix, ties included (small
    integer scores tie a lot; continuous ones almost never)."""
    from mmprune.prune.masks import unstructured_row_mask_by_sort

    g = torch.Generator().manual_seed(int(sparsity * 100))
    for score in (torch.randint(0, 4, (9, 12), generator=g).float(), torch.rand(7, 30, generator=g),
                  torch.zeros(3, 8)):
        fast = unstructured_row_mask(score, sparsity, rounding)
        slow = unstructured_row_mask_by_sort(score, sparsity, rounding)
        assert torch.equal(fast, slow), (score, sparsity, rounding)
