"""Small pieces shared by the trainers of the embedded tiny models (llava/, videollama2/).

Training a tiny model on CPU is dominated by forward/backward only if making a sample is cheap;
drawing, encoding and tokenising a fresh sample every step is not. A `SamplePool` keeps prepared
samples in memory and replaces a few of them every step, so the data stays varied over a run at
a small fraction of the cost.
"""

from __future__ import annotations

import math
import random
import sys
from typing import Callable

from tqdm import tqdm


class SamplePool:
    """Prepared training samples; `make()` returns a new one."""

    def __init__(self, make: Callable[[], object]):
        self.make = make
        self.items: list = []
        self.made = 0

    def _new(self):
        self.made += 1
        return self.make()

    def fill(self, size: int, desc: str = "training samples") -> None:
        """Make samples until the pool holds `size`."""
        for _ in tqdm(range(size - len(self.items)), desc=desc, file=sys.stderr):
            self.items.append(self._new())

    def refresh(self, count: int, rng: random.Random) -> None:
        """Replace `count` samples at random positions by new ones."""
        if not self.items:
            raise ValueError("the pool is empty; call fill() first")
        for _ in range(count):
            self.items[rng.randrange(len(self.items))] = self._new()

    def draw(self, count: int, rng: random.Random) -> list:
        """`count` samples drawn uniformly with replacement."""
        if not self.items:
            raise ValueError("the pool is empty; call fill() first")
        return [self.items[rng.randrange(len(self.items))] for _ in range(count)]


def warmup_cosine(step: int, progress: float, warmup: int, peak: float, floor: float = 0.1) -> float:
    """Learning rate: linear warmup over `warmup` steps, then cosine decay from `peak` to
    `floor * peak` as `progress` goes from 0 to 1 (clamped)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
