"""Wanda's input statistic: per input channel, the mean of x_c^2 over the calibration tokens."""

from __future__ import annotations

import torch


class InputNorms:
    """Running float32 sums of squared inputs per channel, for each linear of a block."""

    def __init__(self) -> None:
        self.sum_sq: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        """x: (tokens, in_features), the rows that count for this sample."""
        partial = x.float().pow(2).sum(dim=0)
        if name in self.sum_sq:
            self.sum_sq[name] += partial
            self.tokens[name] += x.shape[0]
        else:
            self.sum_sq[name] = partial
            self.tokens[name] = x.shape[0]

    def norm(self, name: str) -> torch.Tensor:
        """||X_c|| up to a constant per linear (the token count never changes a ranking)."""
        return (self.sum_sq[name] / max(self.tokens[name], 1)).sqrt()


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """S_rc = |W_rc| * ||X_c||, in float32."""
    return weight.detach().float().abs() * input_norm.to(weight.device).float().unsqueeze(0)
