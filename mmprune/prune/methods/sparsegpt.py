"""SparseGPT: one-shot OBS pruning with weight reconstruction (Frantar & Alistarh, 2023).

Per linear: H = (2/n) sum_b X_b^T X_b over the n calibration samples (float32); columns are
processed in blocks of 128 using the upper Cholesky factor U of H^-1; the mask of a block is
chosen once from w^2 / U_jj^2 (unstructured) or per M-group of columns (N:M); the error of each
pruned column is spread over the remaining columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mmprune.prune.allocation.das import linear_name
from mmprune.prune.driver import LinearTaps
from mmprune.prune.methods.wanda import LinearResult
from mmprune.prune.sparsity import SparsityPattern


class HessianAccumulator:
    """Running float32 average of 2 X^T X per distinct input (q/k/v share one, gate/up one)."""

    def __init__(self) -> None:
        self.hessian: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        x = x.float()
        n = self.samples.get(name, 0)
        if name not in self.hessian:
            self.hessian[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        h = self.hessian[name]
        h.mul_(n / (n + 1))
        h.addmm_(x.T, x, alpha=2.0 / (n + 1))
        self.samples[name] = n + 1


def inverse_cholesky_upper(hessian: torch.Tensor, percdamp: float, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1; damping grows 10x per failed factorisation.
    Returns the factor and the relative damping used."""
    diag_mean = torch.mean(torch.diag(hessian))
    relative = percdamp
    # at most two C x C matrices alive at once (down_proj of an 8B model: C = 14336, 0.8 GB each)
    for _ in range(max_tries):
        damped = hessian.clone()
        damped.diagonal().add_(relative * diag_mean)  # = H + damp * I, without an identity matrix
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0:
                return upper, relative
        relative *= 10
    raise RuntimeError(f"the Hessian does not factor even with damping {relative / 10:g} x mean(diag)")


@torch.no_grad()
def sparsegpt_prune_(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: SparsityPattern,
                     blocksize: int = 128, percdamp: float = 0.01) -> dict:
    """Prune `weight` (out x in) in place; returns {"damping": used, "loss": reconstruction loss}."""
    w = weight.detach().float().clone()
    dead = torch.diag(hessian) == 0
    h = hessian
    if dead.any():  # copy only when it must change: the caller's Hessian may serve other linears
        h = hessian.clone()
        h[dead, dead] = 1.0
    w[:, dead] = 0.0
    upper, damping = inverse_cholesky_upper(h, percdamp)
    rows, cols = w.shape
    loss = torch.zeros(rows, device=w.device)
    pruned_so_far = 0
    for start in range(0, cols, blocksize):
        stop = min(start + blocksize, cols)
        w_blk = w[:, start:stop].clone()
        q_blk = torch.zeros_like(w_blk)
        err_blk = torch.zeros_like(w_blk)
        u_blk = upper[start:stop, start:stop]
        diag = torch.diag(u_blk)
        if pattern.is_nm:
            mask = torch.zeros_like(w_blk, dtype=torch.bool)
        else:
            scores = (w_blk ** 2 / diag.unsqueeze(0) ** 2).reshape(1, -1)
            # counts carried across blocks so the matrix total is round(s * numel), not a sum of floors
            count = int(round(sparsity * rows * stop)) - pruned_so_far
            pruned_so_far += count
            order = torch.sort(scores, dim=1, stable=True).indices[0, :count]
            mask = torch.zeros(scores.numel(), dtype=torch.bool, device=w.device)
            mask[order] = True
            mask = mask.reshape(w_blk.shape)
        for i in range(stop - start):
            column = w_blk[:, i]
            if pattern.is_nm and i % pattern.m == 0:
                group = w_blk[:, i:i + pattern.m] ** 2 / diag[i:i + pattern.m].unsqueeze(0) ** 2
                lowest = torch.sort(group, dim=1, stable=True).indices[:, :pattern.n]
                mask.scatter_(1, i + lowest, True)
            q = column.masked_fill(mask[:, i], 0.0)
            q_blk[:, i] = q
            loss += (column - q) ** 2 / diag[i] ** 2 / 2
            err = (column - q) / diag[i]
            w_blk[:, i:] -= err.unsqueeze(1) * u_blk[i, i:].unsqueeze(0)
            err_blk[:, i] = err
        w[:, start:stop] = q_blk
        w[:, stop:] -= err_blk @ upper[start:stop, stop:]
    weight.data.copy_(w.to(weight.dtype))
    return {"damping": damping, "loss": float(loss.sum())}


@dataclass
class SparseGPTPruner:
    """Block visitor: Hessians from the block's calibration inputs, then OBS pruning per linear."""

    prefix: str
    pattern: SparsityPattern
    sparsity: dict[str, float]
    blocksize: int = 128
    percdamp: float = 0.01
    keep_outputs = False
    modifies_block = True
    results: list[LinearResult] = field(default_factory=list)
    damping: dict[str, float] = field(default_factory=dict)  # linears that needed more damping
    losses: dict[str, float] = field(default_factory=dict)

    def begin_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        self._hessians = HessianAccumulator()
        self._shared: dict[str, str] = {}

    def observe(self, index, sample, block_input, block_output, taps: LinearTaps, modality_ids, kwargs) -> None:
        seen: dict[int, str] = {}
        for rel, x in taps.inputs.items():
            owner = seen.setdefault(x.data_ptr(), rel)  # linears fed by one tensor share its Hessian
            self._shared[rel] = owner
            if owner == rel:
                self._hessians.add(rel, x)

    def end_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        for rel, linear in linears.items():
            name = linear_name(self.prefix, index, rel)
            target = self.pattern.ratio if self.pattern.is_nm else self.sparsity[name]
            hessian = self._hessians.hessian[self._shared[rel]]
            info = sparsegpt_prune_(linear.weight, hessian, target, self.pattern, self.blocksize, self.percdamp)
            if info["damping"] != self.percdamp:
                self.damping[name] = info["damping"]
            self.losses[name] = info["loss"]
            zeros = int((linear.weight == 0).sum())
            self.results.append(LinearResult(name, tuple(linear.weight.shape), target, zeros))
        del self._hessians
