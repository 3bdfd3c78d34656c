"""FitPrune's attention statistics and its two drop rules.

Per layer, the max-over-heads attention probabilities Ā[q, k] from the visual block V (self score
s_j) and from the tokens after it T (cross score c_j) to each visual token j, computed from the
layer's own post-RoPE q and k in row chunks (no N x N matrix is kept, no eager attention). The
search drops by the tolerance rule (`fit_keep`), inference by the lowest products s_j * c_j
(`product_drop`).
"""

from __future__ import annotations

import torch

# rows of the probability matrix computed at once (bounds memory to H * rows * n floats)
_ROW_CHUNK = 256


def max_head_probs(query: torch.Tensor, key: torch.Tensor, first_row: int, v_start: int,
                   n_visual: int, scaling: float) -> torch.Tensor:
    """Ā[r, j] = max_h softmax_causal(q_h k_hᵀ·scaling)[r, v_start + j] for the query rows first_row..n-1.

    query (H, n, hd) and key (KV, n, hd) are post-RoPE for the current sequence of n tokens (query
    head h uses key head h // (H/KV)). float32, (n - first_row, n_visual).
    """
    n_heads, n_tokens, head_dim = query.shape
    n_kv = key.shape[0]
    groups = n_heads // n_kv
    keys_t = key.float().transpose(1, 2)  # (KV, hd, n)
    out = []
    for begin in range(first_row, n_tokens, _ROW_CHUNK):
        rows = min(_ROW_CHUNK, n_tokens - begin)
        # causal mask as an additive bias: row i (position begin + i) sees columns 0..begin + i
        bias = torch.full((rows, n_tokens), float("-inf"), device=query.device).triu_(begin + 1)
        # query heads of one key head side by side: scale, mask and QKᵀ in one batched baddbmm
        q = query[:, begin:begin + rows].float().reshape(n_kv, groups * rows, head_dim)
        logits = torch.baddbmm(bias.repeat(groups, 1), q, keys_t, alpha=scaling)
        probs = torch.softmax(logits, dim=-1).view(n_kv, groups, rows, n_tokens)
        out.append(probs[..., v_start:v_start + n_visual].amax(dim=(0, 1)))
    return torch.cat(out)


def visual_scores(query: torch.Tensor, key: torch.Tensor, v_start: int, n_visual: int,
                  scaling: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(s, c, |T|): self score s_j = Σ_{i∈V} Ā[i, j] / |V| and the unnormalised cross score
    c_j = Σ_{t∈T} Ā[t, j] for each current visual token j, with T every token after V."""
    n_tokens = query.shape[1]
    probs = max_head_probs(query, key, v_start, v_start, n_visual, scaling)
    return probs[:n_visual].sum(0) / n_visual, probs[n_visual:].sum(0), n_tokens - v_start - n_visual


def product_drop(s: torch.Tensor, c: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Indices of the n_drop visual tokens with the lowest s*c (ties: the earlier position first)."""
    return torch.sort(s * c, stable=True).indices[:n_drop]


def product_keep(s: torch.Tensor, c: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Sorted indices of the visual tokens kept at inference (the complement of product_drop)."""
    keep = torch.ones_like(s, dtype=torch.bool)
    keep[product_drop(s, c, n_drop)] = False
    return keep.nonzero().flatten()


def _deletable(scores: torch.Tensor, floor: float) -> torch.Tensor:
    """Mask of the largest set of lowest-score tokens whose removal keeps Σ kept ≥ floor."""
    order = torch.sort(scores, stable=True).indices
    remaining = scores.sum() - torch.cumsum(scores[order], 0)  # kept mass after deleting 1..n lowest
    count = int((remaining >= floor).sum())  # remaining is non-increasing: a prefix qualifies
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[order[:count]] = True
    return mask


def fit_keep(s: torch.Tensor, c_mean: torch.Tensor, s_ref: float, c_ref: float, alpha: float) -> torch.Tensor:
    """The search's rule: drop D_s ∩ D_c, where D_x holds as many lowest-x tokens as possible while
    the kept x-mass stays ≥ (1-α)·reference; at least one visual token stays."""
    drop = _deletable(s, (1 - alpha) * s_ref) & _deletable(c_mean, (1 - alpha) * c_ref)
    if bool(drop.all()):  # keep the best-scoring token (by product) so V never empties
        drop[torch.argmax(s * c_mean)] = False
    return (~drop).nonzero().flatten()
