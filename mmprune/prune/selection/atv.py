"""ATV-Pruning's token rule (Li, Qian and Han, "Mostly Text, Smart Visuals: Asymmetric Text-Visual
Pruning for Large Vision-Language Models", arXiv 2603.16001): which calibration tokens count in
Wanda's ||X|| for one decoder block.

Per block, with the block's weights still dense and its inputs from the already pruned blocks:
  drift d_t = 1 - cos(x_in_t, x_out_t) of every non-text token t;
  d_bar = mean drift over all non-text tokens of all samples (per group, see below);
  per sample k = min(round(min(1, alpha * d_bar) * n_text), n_group), Python's round (half to even);
  counted tokens = every token outside the groups + the k highest-drift tokens of each group
  (ties: the lower position first).
A group is one non-text modality (`separate`, the default: LLaVA's image; VideoLLaMA2's video and
audio each on its own drift) or all non-text modalities together (`pooled`). n_text counts the
tokens outside every group (text, template, answer). See docs/method.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmprune.base.errors import UserInputError

GROUPINGS = ("separate", "pooled")


@dataclass(frozen=True)
class ATVConfig:
    alpha: float = 1.0
    grouping: str = "separate"

    def __post_init__(self) -> None:
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise UserInputError(f"--atv_alpha must be a finite number >= 0 (1 is the paper's), got {self.alpha}")
        if self.grouping not in GROUPINGS:
            raise UserInputError(f"--atv_modalities must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")


def token_drift(block_input: torch.Tensor, block_output: torch.Tensor) -> torch.Tensor:
    """1 - cos(x_in, x_out) per token, float32; inputs (L, d) or (1, L, d)."""
    x_in = block_input.reshape(-1, block_input.shape[-1]).float()
    x_out = block_output.reshape(-1, block_output.shape[-1]).float()
    return 1.0 - F.cosine_similarity(x_in, x_out, dim=-1)


def visual_budget(mean_drift: float, n_text: int, n_visual: int, alpha: float) -> int:
    """k = min(round(min(1, alpha * mean_drift) * n_text), n_visual); round half to even."""
    return min(round(min(1.0, alpha * mean_drift) * n_text), n_visual)


def group_of_tokens(modality_ids: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Per token, the index of its group, or -1 for a token outside every group (text)."""
    ids_long = modality_ids.long()
    out = torch.full(ids_long.shape, -1, dtype=torch.long, device=ids_long.device)
    for g, ids in enumerate(groups):  # a handful of groups, never a loop over tokens
        out[torch.isin(ids_long, torch.tensor(ids, dtype=torch.long, device=ids_long.device))] = g
    return out


def keep_mask(drift: torch.Tensor, group: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """True for every token outside the groups and for the k[g] highest-drift tokens of each group g
    (ties: the lower position first). drift (L,), group (L,) in {-1, 0..G-1}, k (G,) long."""
    order = torch.sort(drift, descending=True, stable=True).indices  # equal drifts keep position order
    order = order[torch.sort(group[order], stable=True).indices]  # grouped, drift order inside each group
    sorted_group = group[order]
    counts = torch.bincount(sorted_group + 1, minlength=k.numel() + 1)
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each group (text first)
    rank = torch.arange(order.numel(), device=drift.device) - starts[sorted_group + 1]
    budget = torch.cat([torch.full((1,), order.numel(), dtype=torch.long, device=drift.device), k.to(drift.device)])
    keep = torch.empty_like(group, dtype=torch.bool)
    keep[order] = rank < budget[sorted_group + 1]
    return keep


def keep_mask_slow(drift: list[float], group: list[int], k: list[int]) -> list[bool]:
    """The same rule in plain Python, for the tests."""
    keep = [g < 0 for g in group]
    for g, budget in enumerate(k):
        members = sorted((t for t in range(len(group)) if group[t] == g), key=lambda t: (-drift[t], t))
        for t in members[:budget]:
            keep[t] = True
    return keep


class DriftSelection:
    """One block's ATV state: each sample's drifts from the dense pre-pass, then the counted tokens
    of each sample, and per block what was kept (`report`)."""

    def __init__(self, cfg: ATVConfig, modality_names: dict[int, str]):
        self.cfg = cfg
        self.names = modality_names
        self.non_text = sorted(m for m, name in modality_names.items() if name != "text")
        if cfg.grouping == "pooled":
            self.groups = [self.non_text] if self.non_text else []
        else:
            self.groups = [[m] for m in self.non_text]
        self.report: dict[int, dict] = {}
        self.begin_block()

    def begin_block(self) -> None:
        self._drift: dict[int, torch.Tensor] = {}
        self._modality: dict[int, torch.Tensor] = {}
        self._keep: dict[int, torch.Tensor] = {}

    def add(self, sample: int, drift: torch.Tensor, modality_ids: torch.Tensor) -> None:
        self._drift[sample], self._modality[sample] = drift, modality_ids.reshape(-1)

    def kept(self, sample: int) -> torch.Tensor:
        """Boolean mask of the sample's tokens that count in ||X||."""
        return self._keep[sample]

    def _members(self, sample: int) -> torch.Tensor:
        """(L, M) bool: token t belongs to the m-th non-text modality."""
        ids = self._modality[sample].to(self._drift[sample].device).long()
        return ids.unsqueeze(1) == torch.tensor(self.non_text, dtype=torch.long, device=ids.device)

    def finish_block(self, index: int) -> None:
        """Mean drift per group over all samples' tokens, then each sample's k and counted tokens."""
        drift_sum = torch.zeros(len(self.non_text), dtype=torch.float64)
        tokens = torch.zeros(len(self.non_text), dtype=torch.long)
        for sample, drift in self._drift.items():
            members = self._members(sample)
            drift_sum += (drift.double() @ members.double()).cpu()
            tokens += members.sum(dim=0).cpu()
        column = {m: i for i, m in enumerate(self.non_text)}
        mean = [float(sum(drift_sum[column[m]] for m in g)) / max(sum(int(tokens[column[m]]) for m in g), 1)
                for g in self.groups]
        kept = torch.zeros(len(self.non_text), dtype=torch.long)
        counted = total = 0
        for sample, drift in self._drift.items():
            group = group_of_tokens(self._modality[sample].to(drift.device), self.groups)
            sizes = torch.bincount(group + 1, minlength=len(self.groups) + 1).tolist()  # text first
            k = torch.tensor([visual_budget(mean[g], sizes[0], sizes[g + 1], self.cfg.alpha)
                              for g in range(len(self.groups))], dtype=torch.long)
            keep = keep_mask(drift, group, k)
            self._keep[sample] = keep
            kept += (self._members(sample) & keep.unsqueeze(1)).sum(dim=0).cpu()
            counted += int(keep.sum())
            total += keep.numel()
        names = [self.names[m] for m in self.non_text]
        block = {
            "mean_drift": {n: float(drift_sum[i]) / max(int(tokens[i]), 1) for i, n in enumerate(names)},
            "visual_kept_share": {n: int(kept[i]) / max(int(tokens[i]), 1) for i, n in enumerate(names)},
            "visual_kept": {n: int(kept[i]) for i, n in enumerate(names)},
            "visual_tokens": {n: int(tokens[i]) for i, n in enumerate(names)},
            "counted_token_share": counted / max(total, 1),
        }
        if self.cfg.grouping == "pooled":
            block["pooled_mean_drift"] = mean[0] if mean else 0.0
        self.report[index] = block
