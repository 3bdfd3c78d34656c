"""Parts 1-3 of the benchmarks: DAS diversity, AMIA selection and the attention row, each against
the slow obvious computation (the public code's), side by side in one process.

Sizes follow one 672x672 LLaVA-NeXT image plus its prompt: N = 2928 tokens, of which the image
takes 2880 and the text 48 (synthetic features: a few smooth factors over the image grid plus
noise, so tokens are correlated as real image features are and AMIA keeps a realistic set).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from bench.common import Measure, best_of, measure, ratio
from mmprune.prune.selection.amia import AMIAConfig, build_graph, greedy_select, greedy_select_direct, kernel_, propagate, stop_threshold
from mmprune.prune.attention import last_token_attention
from mmprune.prune.diversity import normalize_rows, similarity_terms

N_TOKENS = 2928
N_TEXT = 48
HIDDEN = 4096


def synthetic_tokens(n: int, d: int, n_text: int = N_TEXT, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features N x d, modality ids: 0 text then 1 image); image tokens vary smoothly over a
    square grid through 16 random factors, text tokens share another mean direction."""
    g = torch.Generator().manual_seed(seed)
    n_image = n - n_text
    side = int(n_image ** 0.5) + 1
    rows = torch.arange(n_image) // side / side
    cols = torch.arange(n_image) % side / side
    freqs = torch.rand(16, 2, generator=g) * 6.0
    phases = torch.rand(16, generator=g) * 6.3
    factors = torch.cos(rows[:, None] * freqs[:, 0] + cols[:, None] * freqs[:, 1] + phases)  # (n_image, 16)
    image = factors @ torch.randn(16, d, generator=g) + 2.0 * torch.randn(d, generator=g)
    image += 1.5 * torch.randn(n_image, d, generator=g)
    text = 3.0 * torch.randn(d, generator=g) + 2.0 * torch.randn(n_text, d, generator=g)
    ids = torch.cat([torch.zeros(n_text, dtype=torch.int8), torch.ones(n_image, dtype=torch.int8)])
    return torch.cat([text, image]), ids


def pairwise_similarity_terms(features: torch.Tensor, modality_ids: torch.Tensor, mode: str) -> dict:
    """The explicit computation: the full N x N cosine matrix, then per-modality averages of its
    entries (intra: strict upper triangle, all of it for `mean`, only > 0 for `positive`)."""
    unit = normalize_rows(features)
    cosine = unit @ unit.T
    present = sorted(int(m) for m in torch.unique(modality_ids))
    index = {m: (modality_ids == m).nonzero().squeeze(1) for m in present}
    terms = {}
    for i, m in enumerate(present):
        block = cosine[index[m]][:, index[m]]
        upper = block[torch.triu(torch.ones_like(block, dtype=torch.bool), diagonal=1)]
        if mode == "positive":
            upper = upper[upper > 0]
        terms[(m, m)] = float(upper.double().mean())
        for m2 in present[i + 1:]:
            terms[(m, m2)] = float(cosine[index[m]][:, index[m2]].double().mean())
    return terms


def _max_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    return max(abs(a[k] - b[k]) for k in a)


def bench_das(repeats: int = 2) -> dict:
    features, ids = synthetic_tokens(N_TOKENS, HIDDEN)
    out = {"N": N_TOKENS, "d": HIDDEN}
    # mean mode: O(N d) sums against the O(N^2 d) pairwise matrix, alternating
    with measure() as slow:
        reference = pairwise_similarity_terms(features, ids, "mean")
    fast_s, fast = best_of(lambda: similarity_terms(features, ids, "mean"), repeats)
    with measure() as fast_mem:
        similarity_terms(features, ids, "mean")
    out["mean"] = {"pairwise_s": slow.seconds, "ours_s": fast_s, "speedup": ratio(slow.seconds, fast_s),
                   "pairwise_peak_mb": slow.peak_mb, "ours_peak_mb": fast_mem.peak_mb,
                   "max_abs_diff": _max_gap(reference, fast)}
    # positive mode: chunked rows of 1024 against one N x N block
    with measure() as unchunked:
        full = similarity_terms(features, ids, "positive", chunk_size=N_TOKENS)
    with measure() as chunked:
        part = similarity_terms(features, ids, "positive", chunk_size=1024)
    reference = pairwise_similarity_terms(features, ids, "positive")
    out["positive"] = {"unchunked_s": unchunked.seconds, "chunked_s": chunked.seconds,
                       "unchunked_peak_mb": unchunked.peak_mb, "chunked_peak_mb": chunked.peak_mb,
                       "memory_ratio": ratio(unchunked.peak_mb, chunked.peak_mb),
                       "max_abs_diff_chunked_unchunked": _max_gap(full, part),
                       "max_abs_diff_vs_pairwise": _max_gap(reference, part)}
    return out


def _selection_inputs(width: int, cfg: AMIAConfig):
    features, ids = synthetic_tokens(N_TOKENS, width, seed=width)
    unit = normalize_rows(features)
    graph = build_graph(unit, cfg.knn, cfg.chunk_size)
    threshold = stop_threshold(unit, ids, graph, cfg)
    # attention follows the features (a direction through one token), as the model's does: the
    # greedy picks start in one region and the set grows until it covers the rest (~20 % of N)
    direction = unit[7] - unit[ids == 1].mean(dim=0)
    attention = torch.softmax(unit @ direction * 20.0, dim=0)
    scores = propagate(attention, graph, cfg.propagation_temperature)
    kernel = kernel_(graph, cfg.kernel_sigma)
    return scores, graph, kernel, threshold


def bench_amia(widths=(1024, 4096), repeats: int = 2) -> dict:
    cfg = AMIAConfig()
    out = {"N": N_TOKENS}
    for width in widths:
        scores, graph, kernel, threshold = _selection_inputs(width, cfg)
        with measure(memory=False) as direct:
            reference = greedy_select_direct(scores, graph, kernel, threshold, cfg.suppression_temperature)
        fast_s, picked = best_of(
            lambda: greedy_select(scores, graph, kernel, threshold, cfg.suppression_temperature, check_every=1),
            repeats)
        out[str(width)] = {"direct_s": direct.seconds, "incremental_s": fast_s, "speedup": ratio(direct.seconds, fast_s),
                      "selected": int(picked.numel()), "identical": bool(torch.equal(picked, reference))}
    return out


def _attention_layer() -> tuple[LlamaDecoderLayer, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One 8B-shaped attention (MLP left small: unused here) with RoPE for N positions."""
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=256, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, num_hidden_layers=1, rope_theta=5e5, vocab_size=32)
    config._attn_implementation = "eager"  # returns the full H x N x N probabilities
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    positions = torch.arange(N_TOKENS)[None]
    hidden = torch.randn(1, N_TOKENS, HIDDEN)
    return layer, LlamaRotaryEmbedding(config)(hidden, positions), hidden


@torch.no_grad()
def bench_attention_row() -> dict:
    layer, rope, hidden = _attention_layer()
    causal = torch.full((N_TOKENS, N_TOKENS), float("-inf")).triu(1)[None, None]
    normed = layer.input_layernorm(hidden)
    keys = layer.self_attn.k_proj(normed)[0]  # what the pruner's taps hold after the block's forward
    queries = layer.self_attn.q_proj(normed)  # computed by the forward too (all tokens)
    attn = layer.self_attn

    def full_from_hidden():
        _, probs = attn(hidden_states=normed, position_embeddings=rope, attention_mask=causal)
        return probs[0, :, -1].mean(dim=0)

    def full_from_projections():
        # the probabilities alone, given the forward's q and k: what keeping the full attention
        # matrix adds to a forward (the public code's output_attentions)
        hd, n_kv = attn.head_dim, attn.config.num_key_value_heads
        q = queries.view(1, N_TOKENS, -1, hd).transpose(1, 2)
        k = keys.view(1, N_TOKENS, n_kv, hd).transpose(1, 2).repeat_interleave(attn.num_key_value_groups, dim=1)
        cos, sin = (t.unsqueeze(1) for t in rope)
        q = q * cos + torch.cat((-q[..., hd // 2:], q[..., : hd // 2]), -1) * sin
        k = k * cos + torch.cat((-k[..., hd // 2:], k[..., : hd // 2]), -1) * sin
        return torch.softmax(q @ k.transpose(2, 3) * attn.scaling + causal, dim=-1)[0, :, -1].mean(dim=0)

    out = {"N": N_TOKENS, "heads": 32, "kv_heads": 8, "head_dim": 128}
    runs: dict[str, Measure] = {}
    values = {}
    for name, fn in (("row_from_hidden", lambda: last_token_attention(layer, hidden, rope, causal)),
                     ("full_from_hidden", full_from_hidden),
                     ("row_given_keys", lambda: last_token_attention(layer, hidden, rope, causal, keys)),
                     ("full_given_qk", full_from_projections)):
        with measure() as m:
            values[name] = fn()
        runs[name] = m
    for name in ("row_from_hidden", "row_given_keys"):  # small: take the best of 3 for the time
        runs[name].seconds = min(runs[name].seconds, best_of(
            (lambda: last_token_attention(layer, hidden, rope, causal)) if name == "row_from_hidden"
            else (lambda: last_token_attention(layer, hidden, rope, causal, keys)), 3)[0])
    for name, m in runs.items():
        out[name] = {"s": m.seconds, "peak_mb": m.peak_mb}
    out["max_abs_diff"] = max(float((values["row_from_hidden"] - values["full_from_hidden"]).abs().max()),
                              float((values["row_given_keys"] - values["full_given_qk"]).abs().max()))
    out["speedup_from_hidden"] = ratio(runs["full_from_hidden"].seconds, runs["row_from_hidden"].seconds)
    out["speedup_given_keys"] = ratio(runs["full_given_qk"].seconds, runs["row_given_keys"].seconds)
    out["memory_ratio_from_hidden"] = ratio(runs["full_from_hidden"].peak_mb, max(runs["row_from_hidden"].peak_mb, 1.0))
    out["memory_ratio_given_keys"] = ratio(runs["full_given_qk"].peak_mb, max(runs["row_given_keys"].peak_mb, 1.0))
    return out
