"""Part 5: one decoder block shaped like LLaVA-NeXT-8B's LLM (Llama-3-8B: hidden 4096, MLP 14336,
32 heads, 8 KV heads), random weights, N = 2928 tokens per sample, pruned by the project's own
pipeline (`plan_sparsity` + the sequential driver) with the captured activations in a CPU store.

Per method: time per block per sample (everything that repeats per sample: forward passes,
statistics, DAS/AMIA) and the per-block constant (mask / OBS after the samples), so that
32 blocks x 128 samples extrapolate as 32 * (128 * per_sample + per_block). The floor is the dense
forward of one sample through one block, timed the same way, and its FLOPs.

The OBS presets with TAMP's or ATV's signals (das-sparsegpt, amia-sparsegpt, tamp-obs, attn-sparsegpt,
atv-obs) run
the same way; `obs_ratios` gives their extrapolated time against SparseGPT's (goal: within 1.2x).
Only that part, on a chosen block shape (`python -m bench.run --obs-only smol` records it in
BENCHMARKS.md):

    python -m bench.scale --obs [--shape 8b|smol] [--samples 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from bench.common import MB, measure, rss_mb, single_thread
from bench.micro import N_TOKENS, synthetic_tokens
from mmprune.prune.calibration import CalibrationStore
from mmprune.prune.driver import block_linears, block_output, sweep
from mmprune.prune.methods.sparsegpt import SparseGPTPruner
from mmprune.prune.methods.wanda import WandaPruner
from mmprune.prune.pipeline import PhaseTimer, PruneConfig, make_pruner, plan_sparsity

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
SMOL_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
OBS_METHODS = ("das-sparsegpt", "amia-sparsegpt", "tamp-obs", "attn-sparsegpt", "atv-obs")
FULL_BLOCKS, FULL_SAMPLES = 32, 128
PREFIX = "layers"


def config_8b(attn: str = "sdpa", shape: dict = SHAPE) -> LlamaConfig:
    config = LlamaConfig(**shape, num_hidden_layers=1, rope_theta=5e5, vocab_size=32, max_position_embeddings=8192)
    config._attn_implementation = attn
    return config


def make_block(config: LlamaConfig, dtype=torch.float32, device="cpu") -> nn.Module:
    torch.manual_seed(0)  # every method prunes the same weights
    return LlamaDecoderLayer(config, layer_idx=0).to(device, dtype).eval()


def make_store(config: LlamaConfig, samples: int, device="cpu", dtype=torch.float32,
               store_device="cpu") -> CalibrationStore:
    """Block inputs with the structure of image + text tokens (see bench.micro), RoPE as kwargs."""
    rope = LlamaRotaryEmbedding(config).to(device)
    store = CalibrationStore(device=store_device)
    positions = torch.arange(N_TOKENS, device=device)[None]
    for s in range(samples):
        features, ids = synthetic_tokens(N_TOKENS, config.hidden_size, seed=100 + s)
        hidden = (features / features.std()).to(dtype)[None]
        cos, sin = rope(hidden.to(device), positions)
        store.hidden.append(hidden.to(store_device))
        store.kwargs.append({"position_embeddings": (cos.to(store_device), sin.to(store_device)), "use_cache": False})
        store.modality_ids.append(ids)
        store.labels.append(None)
    return store


def forward_flops(config: LlamaConfig, tokens: int) -> float:
    """Multiply-adds x 2 of one block's forward on `tokens` tokens: the linears, plus QK^T and
    attention x V over the causal half."""
    h, m, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    linear = 2 * tokens * (h * h * 2 + h * kv * 2 + 3 * h * m)
    attention = 2 * 2 * config.num_attention_heads * config.head_dim * tokens * (tokens + 1) / 2
    return linear + attention


def activation_bytes(config: LlamaConfig, tokens: int, bytes_per: int = 4) -> int:
    """One sample's activations inside a block: every distinct linear input and output (what the
    pruners' taps may hold), plus the block input."""
    h, m, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    widths = h + (h + 2 * kv) + (h + h) + (h + 2 * m) + (m + h)  # in; qkv out; o in/out; gate-up in/out; down
    return tokens * widths * bytes_per


class TimedVisitor:
    """Delegates to a pruner and times its end_block (the per-block constant)."""

    def __init__(self, inner):
        self.inner = inner
        self.keep_outputs = inner.keep_outputs
        self.modifies_block = inner.modifies_block
        self.end_seconds = 0.0

    def begin_block(self, *args):
        self.inner.begin_block(*args)

    def observe(self, *args):
        self.inner.observe(*args)

    @property
    def prescans(self) -> bool:  # ATV's dense pre-pass (timed with the samples: it repeats per sample)
        return getattr(self.inner, "prescans", False)

    def prescan(self, *args):
        self.inner.prescan(*args)

    def end_prescan(self, *args):
        self.inner.end_prescan(*args)

    def end_block(self, *args):
        start = time.perf_counter()
        self.inner.end_block(*args)
        self.end_seconds += time.perf_counter() - start


def _store_bytes(store: CalibrationStore) -> int:
    return sum(h.numel() * h.element_size() for h in store.hidden)


def prune_blocks(method: str, blocks: nn.ModuleList, store: CalibrationStore, device: str, desc: str):
    """The pipeline's plan + sequential prune at 50 %, with the pruner's end_block timed.
    Returns (visitor, phase timer, config)."""
    cfg = PruneConfig(method=method, sparsity=0.5, device=device)
    timer = PhaseTimer()
    names = {0: "text", 1: "image"}
    plan, _, _ = plan_sparsity(blocks, PREFIX, store, cfg, names, timer, None)
    visitor = TimedVisitor(make_pruner(cfg, PREFIX, plan, names))
    with timer.phase("prune_sweep"):
        sweep(blocks, store, visitor, device, desc=desc)
    return visitor, timer, cfg


def achieved_sparsity(blocks: nn.ModuleList) -> float:
    linears = [lin for b in blocks for lin in block_linears(b).values()]
    return sum(int((lin.weight == 0).sum()) for lin in linears) / sum(lin.weight.numel() for lin in linears)


def run_method(method: str, config: LlamaConfig, samples: int, device: str = "cpu", dtype=torch.float32,
               store_device: str = "cpu") -> dict:
    """Prune one fresh block with `method` on `samples` samples; times and peak memory."""
    base = rss_mb()
    block = make_block(config, dtype, device)
    blocks = nn.ModuleList([block])
    store = make_store(config, samples, device, dtype, store_device)
    with measure(device) as m:
        visitor, timer, cfg = prune_blocks(method, blocks, store, device, f"8B-shaped block ({method})")
    pruner = visitor.inner
    weights_mb = sum(p.numel() * p.element_size() for p in block.parameters()) / MB
    store_mb = _store_bytes(store) / MB * (2 if cfg.layerwise == "das" else 1)  # DAS sweeps a clone
    out = {
        "samples": samples, "total_s": m.seconds, "per_block_s": visitor.end_seconds,
        "per_sample_s": (m.seconds - visitor.end_seconds) / samples, "phases_s": dict(timer.seconds),
        "achieved_sparsity": achieved_sparsity(blocks), "weights_mb": weights_mb, "store_mb": store_mb,
        "peak_mb": m.peak_total_mb - base if device == "cpu" else m.peak_total_mb,
    }
    if device == "cpu":  # the offloaded store is on the same memory here: report the peak without it
        out["peak_without_store_mb"] = out["peak_mb"] - store_mb
    else:
        out["peak_without_store_mb"] = out["peak_mb"]  # the store lives on the CPU, outside this peak
    if pruner.__class__ is WandaPruner and pruner.amia is not None:
        out["amia_selected_fraction"] = pruner.selection.fractions().get(0)
    if pruner.__class__ is SparseGPTPruner and pruner.tokens is not None:
        facts = list(pruner.hessians.values())
        out["token_share"] = sum(f["tokens"] for f in facts) / sum(f["total_tokens"] for f in facts)
        out["min_rank_fraction"] = min((f["rank"] / f["columns"] for f in facts if f["rank"] is not None), default=None)
    out["extrapolated_s"] = FULL_BLOCKS * (FULL_SAMPLES * out["per_sample_s"] + out["per_block_s"])
    del block, blocks, store, pruner, visitor
    return out


@torch.no_grad()
def dense_forward(config: LlamaConfig, samples: int, device: str = "cpu", dtype=torch.float32) -> dict:
    """The floor: one dense forward per sample through the block."""
    block = make_block(config, dtype, device)
    store = make_store(config, samples, device, dtype, device)
    times = []
    with measure(device) as m:
        for s in range(samples):
            hidden, kwargs = store.inputs(s, device)
            start = time.perf_counter()
            block_output(block, hidden, kwargs)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    flops = forward_flops(config, N_TOKENS)
    per_sample = min(times)
    return {"per_sample_s": per_sample, "flops_per_sample": flops, "gflops_per_s": flops / per_sample / 1e9,
            "peak_above_inputs_mb": m.peak_mb,
            "extrapolated_s": FULL_BLOCKS * FULL_SAMPLES * per_sample}


def obs_ratios(results: dict) -> dict:
    """Each OBS preset's time against SparseGPT's, extrapolated to 32 blocks x 128 samples and per part."""
    base = results["sparsegpt"]
    return {m: {"extrapolated": results[m]["extrapolated_s"] / base["extrapolated_s"],
                "per_sample": results[m]["per_sample_s"] / base["per_sample_s"],
                "per_block": results[m]["per_block_s"] / base["per_block_s"]}
            for m in OBS_METHODS if m in results}


def bench_scale(samples: int = 2, methods=("wanda", "sparsegpt", "tamp", *OBS_METHODS)) -> dict:
    config = config_8b()
    out = {"N": N_TOKENS, "shape": SHAPE, "samples": samples, "dtype": "float32"}
    out["floor"] = dense_forward(config, samples)
    h, m, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    weights = (2 * h * h + 2 * h * kv + 3 * h * m + 2 * h) * 4  # linears and the two norms, float32
    out["bound_mb"] = {"weights": weights / MB, "activations": activation_bytes(config, N_TOKENS) / MB,
                       "transfer_buffer": N_TOKENS * config.hidden_size * 4 / MB}
    out["bound_mb"]["limit_1_5x"] = 1.5 * sum(out["bound_mb"].values())
    for method in methods:
        out[method] = run_method(method, config, samples)
    if "sparsegpt" in out:
        out["obs_ratios"] = obs_ratios(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description="part 5 of make bench, or its OBS part")
    parser.add_argument("--obs", action="store_true", help="only SparseGPT and the OBS presets, ratios printed")
    parser.add_argument("--shape", choices=["8b", "smol"], default="8b",
                        help="block shape: LLaVA-NeXT-8B's decoder or the embedded SmolLM2 default's")
    parser.add_argument("--samples", type=int, default=1)
    args = parser.parse_args()
    single_thread()
    if not args.obs:
        print(json.dumps(bench_scale(args.samples), indent=1, default=str))
        return
    print(json.dumps(bench_obs(args.shape, args.samples), indent=1, default=str))


def bench_obs(shape: str = "smol", samples: int = 1) -> dict:
    """SparseGPT and each OBS preset on one block of `shape` ("8b" or "smol"), and their time ratios."""
    block = SHAPE if shape == "8b" else SMOL_SHAPE
    results = {m: run_method(m, config_8b(shape=block), samples) for m in ("sparsegpt", *OBS_METHODS)}
    return {"shape": shape, "block": block, "N": N_TOKENS, "samples": samples, "results": results,
            "obs_ratios": obs_ratios(results)}


if __name__ == "__main__":
    main()
