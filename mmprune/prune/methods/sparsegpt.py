"""SparseGPT: one-shot OBS pruning with weight reconstruction (Frantar & Alistarh, 2023).

Per linear: H = (2/n) sum_b X_b^T X_b over the n calibration samples (float32); columns are
processed in blocks of 128 using the upper Cholesky factor U of H^-1; the mask of a block is
chosen once from w^2 / U_jj^2 (unstructured) or per M-group of columns (N:M); the error of each
pruned column is spread over the remaining columns.

With a token rule (mmprune.prune.selection.token_rules) the Hessian is built from the tokens the
rule picks, H = (2/n) sum_b X_b[S_b]^T X_b[S_b], or weights, H = (2/n) sum_b X_b^T diag(w_b) X_b;
everything after the Hessian is SparseGPT's. docs/method.md has the presets that use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmprune.prune.allocation.das import linear_name
from mmprune.prune.driver import LinearTaps
from mmprune.prune.methods.wanda import LinearResult
from mmprune.prune.selection.token_rules import TokenRule
from mmprune.prune.sparsity import SparsityPattern


class HessianAccumulator:
    """Running float32 average of 2 X^T X per distinct input (q/k/v share one, gate/up one)."""

    def __init__(self) -> None:
        self.hessian: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}

    def add(self, name: str, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """One sample's rows x (tokens x in); `weights`, one per row, gives 2 X^T diag(w) X."""
        x = x.float()
        n = self.samples.get(name, 0)
        if name not in self.hessian:
            self.hessian[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        h = self.hessian[name]
        h.mul_(n / (n + 1))
        scaled = x if weights is None else x * weights.to(x.device, torch.float32).unsqueeze(1)
        h.addmm_(scaled.T, x, alpha=2.0 / (n + 1))
        self.samples[name] = n + 1


def inverse_cholesky_upper(hessian: torch.Tensor, percdamp: float, max_tries: int = 8) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp I)^-1; damping grows 10x per failed factorisation.
    Returns the factor and the relative damping used."""
    diag_mean = torch.mean(torch.diag(hessian))
    if diag_mean == 0:  # a Hessian of all-zero tokens (an unlucky subset): damp on the unit scale
        diag_mean = torch.ones_like(diag_mean)
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
                     blocksize: int = 128, percdamp: float = 0.01, dead: torch.Tensor | None = None) -> dict:
    """Prune `weight` (out x in) in place; returns {"damping": used, "loss": reconstruction loss}.

    `dead`: input columns zero on every calibration token, whose weights are zeroed (default: the
    zero diagonal of H). A column zero only on the tokens a rule picked is not dead: it keeps its
    weights and the damping keeps H positive definite."""
    w = weight.detach().float().clone()
    if dead is None:
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


def eigenvalues_above(matrix: torch.Tensor, level: float) -> int | None:
    """How many eigenvalues of a symmetric matrix exceed `level`: the positive inertia of
    matrix - level I (Sylvester's law of inertia) from one LDL^T factorisation (Bunch-Kaufman,
    several times faster than the eigenvalues themselves). D has 1x1 and 2x2 blocks; a 2x2 block
    [[a, b], [b, c]] has one positive eigenvalue if ac - b^2 < 0, else two if a + c > 0."""
    shifted = matrix.clone()
    shifted.diagonal().sub_(level)
    ld, pivots, info = torch.linalg.ldl_factor_ex(shifted)
    del shifted
    if int(info) < 0:
        return None
    d = ld.diagonal()
    paired = pivots < 0  # both rows of a 2x2 block carry a negative pivot index
    index = torch.arange(d.numel(), device=d.device)
    last_single = torch.cummax(torch.where(paired, -1, index), dim=0).values
    first = paired & ((index - last_single - 1) % 2 == 0)  # the first row of each 2x2 block
    count = int((d[~paired] > 0).sum())
    k = first.nonzero()[:, 0]
    a, c, b = d[k], d[k + 1], ld[k + 1, k]
    det, trace = a * c - b * b, a + c
    both = torch.where(trace > 0, 2, 0)
    count += int(torch.where(det < 0, 1, torch.where(det > 0, both, (trace > 0).long())).sum())
    return count


@dataclass
class TokenCounts:
    """Per token-rule Hessian: tokens in it, tokens seen, sums of weights (Kish's effective share),
    and the input columns non-zero on some token (the really dead columns are the others)."""

    tokens: int = 0
    total: int = 0
    weight_sum: float = 0.0
    weight_sq_sum: float = 0.0
    live: torch.Tensor | None = None

    def add(self, x: torch.Tensor, counted: int, weights: torch.Tensor | None) -> None:
        self.tokens += counted
        self.total += x.shape[0]
        if weights is not None:
            self.weight_sum += float(weights.sum())
            self.weight_sq_sum += float(weights.pow(2).sum())
        live = x.ne(0).any(dim=0)
        self.live = live if self.live is None else self.live | live


@dataclass
class SparseGPTPruner:
    """Block visitor: Hessians from the block's calibration inputs, then OBS pruning per linear.
    With `tokens`, each Hessian is taken over the tokens (or with the weights) the rule gives."""

    prefix: str
    pattern: SparsityPattern
    sparsity: dict[str, float]
    blocksize: int = 128
    percdamp: float = 0.01
    tokens: TokenRule | None = None  # None: every token, weight 1 (SparseGPT)
    modifies_block = True
    results: list[LinearResult] = field(default_factory=list)
    damping: dict[str, float] = field(default_factory=dict)  # linears that needed more damping
    losses: dict[str, float] = field(default_factory=dict)
    hessians: dict[str, dict[str, Any]] = field(default_factory=dict)  # token rule: each Hessian's facts

    @property
    def keep_outputs(self) -> bool:
        return self.tokens is not None and self.tokens.keep_outputs

    @property
    def prescans(self) -> bool:
        """A rule that needs a dense pass over every sample first (ATV's drift) gets the driver's."""
        return getattr(self.tokens, "prescans", False)

    def prescan(self, index, sample, block_input, block_output, modality_ids) -> None:
        self.tokens.prescan(index, sample, block_input, block_output, modality_ids)

    def end_prescan(self, index: int) -> None:
        self.tokens.end_prescan(index)

    def begin_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        self._hessians = HessianAccumulator()
        self._shared: dict[str, str] = {}
        self._counts: dict[str, TokenCounts] = {}
        self._block = block
        if self.tokens is not None:
            self.tokens.begin_block(index)

    def observe(self, index, sample, block_input, block_output, taps: LinearTaps, modality_ids, kwargs) -> None:
        if self.tokens is None:
            seen: dict[int, str] = {}
            for rel, x in taps.inputs.items():
                owner = seen.setdefault(x.data_ptr(), rel)  # linears fed by one tensor share its Hessian
                self._shared[rel] = owner
                if owner == rel:
                    self._hessians.add(rel, x)
            return
        chosen = self.tokens.choose(index, sample, self._block, block_input, block_output, taps, modality_ids, kwargs)
        # linears fed by one tensor share a Hessian when the rule also gave them one answer
        groups: dict[tuple[int, int], str] = {}
        for rel, x in taps.inputs.items():
            pick = None if chosen is None else chosen[rel]
            owner = groups.setdefault((x.data_ptr(), id(pick)), rel)
            self._shared[rel] = owner
            if owner != rel:
                continue
            counts = self._counts.setdefault(rel, TokenCounts())
            if pick is None:  # the rule had nothing to rank by: every token, weight 1
                self._hessians.add(rel, x)
                counts.add(x, x.shape[0], None)
            elif self.tokens.kind == "subset":
                # rows in token order: the sum is the same, and picking every token gives x itself
                self._hessians.add(rel, x[torch.sort(pick).values])
                counts.add(x, pick.numel(), None)
            else:
                self._hessians.add(rel, x, pick)
                counts.add(x, x.shape[0], pick)

    def end_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> None:
        facts: dict[str, dict[str, Any]] = {}
        for rel, linear in linears.items():
            name = linear_name(self.prefix, index, rel)
            target = self.pattern.ratio if self.pattern.is_nm else self.sparsity[name]
            owner = self._shared[rel]
            hessian = self._hessians.hessian[owner]
            counts = self._counts.get(owner)
            dead = None if counts is None else ~counts.live
            info = sparsegpt_prune_(linear.weight, hessian, target, self.pattern, self.blocksize, self.percdamp, dead)
            if info["damping"] != self.percdamp:
                self.damping[name] = info["damping"]
            self.losses[name] = info["loss"]
            zeros = int((linear.weight == 0).sum())
            self.results.append(LinearResult(name, tuple(linear.weight.shape), target, zeros))
            if counts is not None:
                if owner not in facts:
                    facts[owner] = self._hessian_facts(hessian, counts, info["damping"])
                facts[owner]["linears"].append(rel)
        for owner, fact in facts.items():
            self.hessians[linear_name(self.prefix, index, owner)] = fact
        del self._hessians, self._counts
        self._block = None

    def _hessian_facts(self, hessian: torch.Tensor, counts: TokenCounts, damping: float) -> dict[str, Any]:
        """What the report keeps of one token-rule Hessian: token share, rank, dead/unseen columns, damping."""
        diag = torch.diag(hessian)
        dead = ~counts.live
        unseen = (diag == 0) & counts.live  # zero on the picked tokens only: left to the damping
        mean_diag = float(torch.where(dead, torch.ones_like(diag), diag).mean())  # as sparsegpt_prune_ damps
        fact: dict[str, Any] = {
            "linears": [], "columns": hessian.shape[0], "tokens": counts.tokens, "total_tokens": counts.total,
            "token_share": counts.tokens / max(counts.total, 1), "dead_columns": int(dead.sum()),
            "unseen_columns": int(unseen.sum()), "damping": damping,
            # numerical rank at the damping's scale: eigenvalues of H above the absolute damping added
            "rank": eigenvalues_above(hessian, damping * (mean_diag if mean_diag > 0 else 1.0)),
            "rank_bound": min(counts.tokens, hessian.shape[0] - int(dead.sum()) - int(unseen.sum())),
        }
        if counts.weight_sq_sum > 0:  # Kish: the share of tokens an unweighted sum of equal power would need
            fact["effective_token_share"] = counts.weight_sum ** 2 / (counts.total * counts.weight_sq_sum)
        return fact
