import math

import pytest
import torch

from mmprune.evaluate.scoring import (
    AnswerTally, greedy_answer, greedy_continue, last_answer_span, normalize_answer, teacher_forced_answer,
)


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


def one_hot_logits(tokens, vocab=10):
    logits = torch.full((len(tokens), vocab), -5.0)
    logits[range(len(tokens)), tokens] = 5.0
    return logits


def test_greedy_answer_reads_the_shared_prefix_and_continues_where_it_leaves_the_reference():
    calls = []

    def continue_after(kept, token, budget):
        calls.append((kept, token, budget))
        return [7, 1][:budget]

    reference = torch.tensor([4, 5, 6, 1])  # stop id 1
    # argmax 4, 5 (as the reference), then 9: greedy left it after 2 shared tokens
    assert greedy_answer(one_hot_logits([4, 5, 9, 1]), reference, [1], 8, continue_after) == [4, 5, 9, 7, 1]
    assert calls == [(2, 9, 5)]
    calls.clear()  # a wrong stop token ends the answer: nothing to decode
    assert greedy_answer(one_hot_logits([4, 1, 6, 1]), reference, [1], 8, continue_after) == [4, 1] and not calls
    # the token limit ends it too, even on the reference
    assert greedy_answer(one_hot_logits([4, 5, 6, 1]), reference, [1], 2, continue_after) == [4, 5] and not calls
    # the whole reference followed but it has no stop token: go on after its last token
    assert greedy_answer(one_hot_logits([4, 5]), reference[:2], [1], 8, continue_after) == [4, 5, 7, 1]
    assert calls == [(1, 5, 6)]


def test_greedy_continue_feeds_each_argmax_until_a_stop_or_the_budget():
    fed = []
    table = {3: 4, 4: 2, 2: 1}  # token -> next argmax

    def step(token):
        fed.append(token)
        return one_hot_logits([table[token]])[0]

    assert greedy_continue(step, 3, 8, [1]) == [4, 2, 1] and fed == [3, 4, 2]
    fed.clear()
    assert greedy_continue(step, 3, 2, [1]) == [4, 2] and fed == [3, 4]
    assert greedy_continue(step, 3, 0, [1]) == []


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
