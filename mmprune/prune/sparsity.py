"""Sparsity targets and patterns: parsing and validation of what the user asked for."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mmprune.base.errors import UserInputError


def check_ratio(value: float, name: str = "--llm_sparsity_ratio") -> float:
    """A sparsity ratio must be a finite number in [0, 1)."""
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise UserInputError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
        raise UserInputError(
            f"{name} must be in [0, 1) (fraction of weights set to zero), got {value!r}; "
            "e.g. 0.5 prunes half of the weights"
        )
    return ratio


@dataclass(frozen=True)
class SparsityPattern:
    """`unstructured` (any weight may go) or N:M (N zeros in every M consecutive inputs of a row)."""

    n: int = 0
    m: int = 0

    @property
    def is_nm(self) -> bool:
        return self.m > 0

    @property
    def ratio(self) -> float:
        return self.n / self.m if self.is_nm else float("nan")

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else "unstructured"

    @classmethod
    def parse(cls, text: str) -> "SparsityPattern":
        text = (text or "").strip()
        if text == "unstructured":
            return cls()
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match:
            raise UserInputError(
                f"--sparsity_type must be 'unstructured' or N:M such as 2:4 or 4:8, got {text!r}"
            )
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise UserInputError(f"--sparsity_type {text}: N:M needs 0 < N < M (e.g. 2:4)")
        return cls(n, m)

    def check_against_ratio(self, ratio: float) -> None:
        """N:M fixes the sparsity at N/M; a different requested ratio is a contradiction."""
        if self.is_nm and abs(self.ratio - ratio) > 1e-9:
            raise UserInputError(
                f"--sparsity_type {self} prunes exactly {self.ratio:g} of each row, but the "
                f"sparsity ratio is {ratio:g}; pass {self.ratio:g} as the ratio or choose an N:M "
                f"pattern with N/M = {ratio:g} (2:4 and 4:8 give 0.5)"
            )

    def check_divides(self, in_features: int, what: str) -> None:
        if self.is_nm and in_features % self.m:
            raise UserInputError(
                f"--sparsity_type {self}: M={self.m} does not divide the {in_features} input "
                f"features of {what}; choose M that divides every pruned linear's input size "
                "(2:4 and 4:8 fit LLaMA/Qwen2 sizes)"
            )
