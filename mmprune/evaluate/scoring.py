"""Answer scoring shared by the evaluation CLIs of both models: exact match after normalisation,
answer-token perplexity, per-kind tallies, and the shortcut that skips greedy decoding when one
teacher-forced pass already shows what it would produce."""

from __future__ import annotations

import math
import re

import torch

IGNORE_INDEX = -100


def normalize_answer(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or trailing punctuation."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(".!?,;:").strip()


def last_answer_span(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[int, int] | None:
    """[start, end) of the last run of labelled positions in a (1, L) labels tensor."""
    labelled = labels[0] != ignore_index
    if not bool(labelled.any()):
        return None
    end = int(labelled.nonzero()[-1]) + 1
    unlabelled_before = (~labelled[:end]).nonzero()
    start = int(unlabelled_before[-1]) + 1 if len(unlabelled_before) else 0
    return start, end


def teacher_forced_answer(logits: torch.Tensor, targets: torch.Tensor, stop_ids: list[int],
                          max_new_tokens: int) -> tuple[float, list[int] | None]:
    """(answer NLL sum, greedy answer or None) from the logits predicting each reference token.

    If the argmax at every answer position reproduces the reference through its first stop token,
    greedy decoding would produce exactly that (each step sees the same prefix), so it is returned
    and need not be rerun; otherwise None, and the caller decodes.
    """
    logits = logits.float()
    targets = targets.to(logits.device)
    nll = float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
    predicted, reference = logits.argmax(dim=-1).tolist(), targets.tolist()
    stops = [i for i, t in enumerate(reference) if t in stop_ids]
    if stops and stops[0] < max_new_tokens and predicted[:stops[0] + 1] == reference[:stops[0] + 1]:
        return nll, reference[:stops[0] + 1]
    return nll, None


def greedy_answer(logits: torch.Tensor, targets: torch.Tensor, stop_ids: list[int], max_new_tokens: int,
                  continue_after) -> list[int]:
    """The greedy answer, from the teacher-forced logits predicting each reference token. While
    the argmax reproduces the reference, greedy decoding takes exactly those steps, so they are read
    off; at the first token that differs it leaves the reference, and `continue_after(k, token,
    budget)` decodes the rest (at most `budget` tokens) on the KV cache of the prompt plus the
    first k reference tokens, fed `token` first. Saves the second pass over the whole prompt."""
    tokens: list[int] = []
    for guess, truth in zip(logits.argmax(dim=-1).tolist(), targets.tolist()):  # a few answer tokens
        tokens.append(guess)
        if guess in stop_ids or len(tokens) == max_new_tokens:
            return tokens
        if guess != truth:
            break
    return tokens + continue_after(len(tokens) - 1, tokens[-1], max_new_tokens - len(tokens))


def greedy_continue(step, token: int, budget: int, stop_ids: list[int]) -> list[int]:
    """Feed `token`, then each argmax, until a stop token or `budget` new tokens; `step(token)` runs
    the model on one token over its KV cache and returns the next-token logits."""
    tokens: list[int] = []
    while len(tokens) < budget:
        token = int(step(token).argmax())
        tokens.append(token)
        if token in stop_ids:
            break
    return tokens


def cut_cache(cache, length: int) -> None:
    """Keep the first `length` positions of a transformers KV cache. Its crop() takes the number of
    positions to remove as a negative count (transformers 5.24 refuses a positive length; older
    versions read a negative count the same way)."""
    drop = cache.get_seq_length() - length
    if drop:
        cache.crop(-drop)


class AnswerTally:
    """Exact-match accuracy and token-weighted answer perplexity, overall and per question kind."""

    def __init__(self) -> None:
        self._totals: dict = {}  # kind (None = overall) -> [correct, n, nll, tokens]

    def add(self, kind, correct: bool, nll: float, tokens: int) -> None:
        for key in {None, kind}:
            acc = self._totals.setdefault(key, [0, 0, 0.0, 0])
            acc[0] += int(correct)
            acc[1] += 1
            acc[2] += nll
            acc[3] += tokens

    @staticmethod
    def _summary(correct: int, n: int, nll: float, tokens: int) -> dict:
        return {"n": n, "accuracy": correct / n if n else None,
                "answer_perplexity": math.exp(nll / tokens) if tokens else None}  # None: no answer tokens

    def result(self) -> dict:
        """{"n", "accuracy", "answer_perplexity", "per_kind": {kind: {same three}}}."""
        result = self._summary(*self._totals.get(None, [0, 0, 0.0, 0]))
        result["per_kind"] = {kind: self._summary(*acc) for kind, acc in sorted(self._totals.items(), key=lambda kv: str(kv[0]))
                              if kind is not None}
        return result
