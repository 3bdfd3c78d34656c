"""AMIA token selection: a representative token set picked by attention and a kNN token graph.

Pipeline for one sample and one feature matrix F (N x d):
  cosine C = F^ F^T (chunked), kNN graph on D = 1 - C, one message-passing step from the
  last-token attention, greedy selection with neighbour suppression until
  MMD^2(all, S) < scale * sqrt(1 - rho). MMD^2 of every prefix comes from running sums, batch by batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mmprune.prune.diversity import normalize_rows, similarity_terms


@dataclass(frozen=True)
class AMIAConfig:
    knn: int = 3
    propagation_temperature: float = 1.0  # g_t = a_t + sum exp(-1.0 D_tu) a_u
    suppression_temperature: float = 0.2  # g_u -= exp(-0.2 D_tu) max(g_t, 0)
    mmd_scale: float = 0.1  # stop when MMD^2 < 0.1 sqrt(1 - rho)
    kernel_sigma: float = 1.0
    similarity_mode: str = "positive"
    features: str = "output"  # "output" (the linear's Z) or "input" (its X)
    scope: str = "linear"  # "linear" or "block"
    chunk_size: int = 1024
    check_every: int = 32  # picks run ahead before the first stop check (then doubling): no sync per step


@dataclass
class TokenGraph:
    cosine: torch.Tensor  # N x N float32; turned into the RBF kernel in place by `kernel_`
    neighbours: torch.Tensor  # N x k indices
    distances: torch.Tensor  # N x k cosine distances


def build_graph(unit: torch.Tensor, k: int, chunk_size: int) -> TokenGraph:
    """Cosine matrix and kNN (self excluded) of unit-norm rows, computed in row chunks."""
    n = unit.shape[0]
    k = min(k, n - 1)
    cosine = torch.empty((n, n), dtype=torch.float32, device=unit.device)
    neighbours = torch.empty((n, max(k, 0)), dtype=torch.long, device=unit.device)
    distances = torch.empty((n, max(k, 0)), dtype=torch.float32, device=unit.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        block = unit[start:stop] @ unit.T
        cosine[start:stop] = block
        if k > 0:
            rows = torch.arange(stop - start, device=unit.device)
            block = block.clone()
            block[rows, rows + start] = float("-inf")  # a token is not its own neighbour
            top = torch.topk(block, k, dim=1)
            neighbours[start:stop] = top.indices
            distances[start:stop] = 1.0 - top.values
    return TokenGraph(cosine, neighbours, distances)


def propagate(attention: torch.Tensor, graph: TokenGraph, temperature: float) -> torch.Tensor:
    """One message-passing step: g_t = a_t + sum over kNN u of exp(-T D_tu) a_u."""
    a = attention.float()
    if graph.neighbours.shape[1] == 0:
        return a.clone()
    return a + (torch.exp(-temperature * graph.distances) * a[graph.neighbours]).sum(dim=1)


def stop_threshold(unit: torch.Tensor, modality_ids: torch.Tensor, graph: TokenGraph, cfg: AMIAConfig) -> float:
    """scale * sqrt(1 - rho), rho the mean DAS similarity term of these features."""
    terms = similarity_terms(unit, modality_ids, cfg.similarity_mode, cfg.chunk_size, cosine=graph.cosine)
    rho = sum(terms.values()) / len(terms) if terms else 0.0
    return cfg.mmd_scale * math.sqrt(max(1.0 - rho, 0.0))


def kernel_(graph: TokenGraph, sigma: float) -> torch.Tensor:
    """RBF kernel on unit vectors, in place of the cosine matrix: exp(-|f-g|^2 / 2 s^2) = exp(-(1-C)/s^2)."""
    return graph.cosine.sub_(1.0).div_(sigma * sigma).exp_()


def _pick_and_suppress(g: torch.Tensor, neighbours: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """Take the best unselected token t (first index on ties) and damp its kNN neighbours by
    exp(-T D_tu) max(g_t, 0). Returns t as a 0-d tensor (no device sync)."""
    t = torch.argmax(g)
    g_t = g[t].clamp_min(0.0)
    g.index_put_((neighbours[t],), -(decay[t] * g_t), accumulate=True)
    g[t] = float("-inf")
    return t


def _run_picks(g: torch.Tensor, neighbours: torch.Tensor, decay: torch.Tensor, picked: torch.Tensor,
               start: int, stop: int) -> None:
    """Greedy picks start..stop-1 into `picked`. On the CPU the loop runs on numpy views of the
    same memory (a few microseconds a step instead of a dozen torch calls); the arithmetic is the
    same float32 as `_pick_and_suppress`, so the picks are identical."""
    if g.device.type != "cpu":
        for step in range(start, stop):
            picked[step] = _pick_and_suppress(g, neighbours, decay)
        return
    g_np, nb, dec, out = g.numpy(), neighbours.numpy(), decay.numpy(), picked.numpy()
    zero = np.float32(0.0)
    for step in range(start, stop):
        t = int(g_np.argmax())  # first index on ties, as torch.argmax
        g_t = g_np[t] if g_np[t] > zero else zero
        g_np[nb[t]] -= dec[t] * g_t
        g_np[t] = -np.inf
        out[step] = t


@torch.no_grad()
def greedy_select(
    scores: torch.Tensor,
    graph: TokenGraph,
    kernel: torch.Tensor,
    threshold: float,
    suppression_temperature: float,
    check_every: int = 32,
) -> torch.Tensor:
    """Greedy selection with incremental MMD^2; returns the selected indices in pick order.

    MMD^2 = mean(K) + sum(K[S,S]) / |S|^2 - 2 sum(K[:,S]) / (N |S|). The pick order does not
    depend on MMD^2, only where the set is cut, so picks run ahead in batches (check_every, then
    doubling) and MMD^2 of every prefix of a batch B is computed at once: adding t grows sum(K[S,S])
    by 2 sum_{u picked before t} K_tu + K_tt and sum(K[:,S]) by colsum_t. The set is cut at the
    first prefix under the threshold: exactly the result of checking after every step.
    """
    g = scores.float().clone()
    n = g.shape[0]
    device = g.device
    mean_all = kernel.mean(dtype=torch.float64)
    column_sums = kernel.sum(dim=0, dtype=torch.float64)
    picked = torch.empty(n, dtype=torch.long, device=device)
    decay = torch.exp(-suppression_temperature * graph.distances)
    sum_ss = torch.zeros((), dtype=torch.float64, device=device)
    sum_xs = torch.zeros((), dtype=torch.float64, device=device)
    size, batch = 0, max(int(check_every), 1)
    while size < n:
        stop = min(size + batch, n)
        _run_picks(g, graph.neighbours, decay, picked, size, stop)
        new = picked[size:stop]
        rows = kernel[new]  # (b, N); K is symmetric: row t is column t
        inside = rows[:, new]
        before = rows[:, picked[:size]].sum(dim=1, dtype=torch.float64) \
            + inside.tril(diagonal=-1).sum(dim=1, dtype=torch.float64)
        ss = sum_ss + torch.cumsum(2.0 * before + inside.diagonal().double(), 0)
        xs = sum_xs + torch.cumsum(column_sums[new], 0)
        sizes = torch.arange(size + 1, stop + 1, dtype=torch.float64, device=device)
        mmd = mean_all + ss / (sizes * sizes) - 2.0 * xs / (n * sizes)
        under = (mmd < threshold).nonzero()
        if under.numel():
            return picked[: size + int(under[0]) + 1]
        sum_ss, sum_xs = ss[-1], xs[-1]
        size, batch = stop, batch * 2
    return picked


@torch.no_grad()
def greedy_select_direct(
    scores: torch.Tensor, graph: TokenGraph, kernel: torch.Tensor, threshold: float, suppression_temperature: float
) -> torch.Tensor:
    """Reference: recompute MMD^2 from K[S,S] and K[:,S] at every step (as the public code does).
    O(|S|^2 + N |S|) per step; used by tests and benchmarks only."""
    g = scores.float().clone()
    n = g.shape[0]
    mean_all = kernel.double().mean()
    decay = torch.exp(-suppression_temperature * graph.distances)
    picked: list[int] = []
    for _ in range(n):
        picked.append(int(_pick_and_suppress(g, graph.neighbours, decay)))
        index = torch.tensor(picked, device=kernel.device)
        value = mean_all + kernel[index][:, index].double().mean() - 2 * kernel[:, index].double().mean()
        if value < threshold:
            break
    return torch.tensor(picked, dtype=torch.long)


def select_tokens(
    features: torch.Tensor,
    attention: torch.Tensor,
    modality_ids: torch.Tensor,
    cfg: AMIAConfig,
    direct: bool = False,
) -> torch.Tensor:
    """Indices (pick order) of the representative tokens of one sample's features (N x d)."""
    unit = normalize_rows(features)
    if unit.shape[0] == 1:
        return torch.zeros(1, dtype=torch.long, device=unit.device)
    graph = build_graph(unit, cfg.knn, cfg.chunk_size)
    threshold = stop_threshold(unit, modality_ids, graph, cfg)
    g = propagate(attention.to(unit.device), graph, cfg.propagation_temperature)
    kernel = kernel_(graph, cfg.kernel_sigma)
    if direct:
        return greedy_select_direct(g, graph, kernel, threshold, cfg.suppression_temperature)
    return greedy_select(g, graph, kernel, threshold, cfg.suppression_temperature, cfg.check_every)
