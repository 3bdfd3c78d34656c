import math

import pytest
import torch

from mmprune.scoring import AnswerTally, last_answer_span, normalize_answer, teacher_forced_answer


def slow_last_span(labels):
    positions = [i for i, v in enumerate(labels) if v != -100]
    if not positions:
        return None
    start = positions[-1]
    while start - 1 in positions:
        start -= 1
    return start, positions[-1] + 1


@pytest.mark.parametrize("labels", [
    [-100, 5, 6, -100, -100, 7, 8, 9],
    [1, 2, 3],
    [-100, -100],
    [4, -100, -100, 5],
    [-100, 3, -100],
])
def test_last_answer_span_matches_the_obvious_version(labels):
    assert last_answer_span(torch.tensor([labels])) == slow_last_span(labels)


def test_normalize_answer():
    assert normalize_answer("  Top\n left!? ") == "top left"


def test_teacher_forced_answer_returns_the_reference_only_when_argmax_reproduces_it():
    targets = torch.tensor([3, 1, 0])  # answer 3, stop token 1, then a token after the stop
    logits = torch.full((3, 4), -5.0)
    logits[0, 3] = logits[1, 1] = 5.0  # right through the stop token
    logits[2, 2] = 5.0  # wrong after the stop: irrelevant
    nll, tokens = teacher_forced_answer(logits, targets, stop_ids=[1], max_new_tokens=8)
    assert tokens == [3, 1]
    expected = float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
    assert nll == pytest.approx(expected)
    logits[1, 1], logits[1, 2] = -5.0, 5.0  # the stop token is missed: must decode
    assert teacher_forced_answer(logits, targets, [1], 8)[1] is None
    logits[1, 1], logits[1, 2] = 5.0, -5.0
    assert teacher_forced_answer(logits, targets, [1], max_new_tokens=1)[1] is None  # stop beyond the limit


def test_tally_overall_and_per_kind():
    tally = AnswerTally()
    tally.add("color", True, 1.0, 2)
    tally.add("color", False, 3.0, 2)
    tally.add("shape", True, 0.0, 1)
    tally.add(None, True, 0.5, 1)
    result = tally.result()
    assert result["n"] == 4 and result["accuracy"] == 0.75
    assert result["answer_perplexity"] == pytest.approx(math.exp(4.5 / 6))
    assert set(result["per_kind"]) == {"color", "shape"}
    assert result["per_kind"]["color"] == {"n": 2, "accuracy": 0.5, "answer_perplexity": pytest.approx(math.exp(1.0))}
