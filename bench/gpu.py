"""Part 6 (only where torch.cuda.is_available()): the whole 32-block 8B-shaped decoder pruned end to
end on the GPU with 128 samples of N = 2928 tokens (bfloat16 weights, blocks kept on the CPU and
moved to the GPU one at a time by the driver, captured activations offloaded to the CPU), and
the inference speedup of 2:4 weights through torch.sparse.to_sparse_semi_structured at prefill
sizes.

The decoder gets synthetic block-0 inputs (bench.micro's image + text token features) instead of
LLaVA-NeXT's embedding stage: the vision tower and projector run once per sample and are not
pruned, so the pruning cost is the decoder's.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from bench.scale import FULL_BLOCKS, FULL_SAMPLES, achieved_sparsity, config_8b, make_store, prune_blocks

DTYPE = torch.bfloat16


def _decoder(config, blocks: int, device: str) -> nn.ModuleList:
    """Random 8B-shaped blocks, initialised on the GPU (fast), then parked on the CPU."""
    torch.manual_seed(0)
    layers = []
    for index in range(blocks):
        with torch.device(device):
            layer = LlamaDecoderLayer(config, layer_idx=index)
        layers.append(layer.to(DTYPE).to("cpu").eval())
    return nn.ModuleList(layers)


def prune_whole_decoder(method: str, blocks: int = FULL_BLOCKS, samples: int = FULL_SAMPLES, config=None,
                        device: str = "cuda") -> dict:
    """`config`/`device` other than the defaults only serve a smoke check of this code off a GPU."""
    config = config or config_8b()
    config.num_hidden_layers = blocks
    cuda = device.startswith("cuda")
    layers = _decoder(config, blocks, device)
    store = make_store(config, samples, device, DTYPE, store_device="cpu")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    _, timer, _ = prune_blocks(method, layers, store, device, f"8B-shaped decoder ({method}, GPU)")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"blocks": blocks, "samples": samples, "seconds": seconds, "phases_s": dict(timer.seconds),
            "max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "achieved_sparsity": achieved_sparsity(layers)}


def _cuda_time(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


@torch.no_grad()
def semi_structured_speedup(tokens=(2048, 4096)) -> dict:
    """Dense vs 2:4 semi-structured F.linear for the 8B block's weight shapes (float16)."""
    from torch.sparse import to_sparse_semi_structured

    shapes = {"q/o (4096x4096)": (4096, 4096), "gate/up (14336x4096)": (14336, 4096),
              "down (4096x14336)": (4096, 14336)}
    out = {}
    for name, (rows, cols) in shapes.items():
        weight = torch.randn(rows, cols, device="cuda", dtype=torch.float16)
        keep = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(rows, cols // 4)
        weight = weight * keep
        try:
            sparse = to_sparse_semi_structured(weight)
        except (RuntimeError, ValueError) as exc:
            out[name] = {"error": str(exc).splitlines()[0]}
            continue
        for n in tokens:
            x = torch.randn(n, cols, device="cuda", dtype=torch.float16)
            dense_s = _cuda_time(lambda: torch.nn.functional.linear(x, weight))
            sparse_s = _cuda_time(lambda: torch.nn.functional.linear(x, sparse))
            close = torch.allclose(torch.nn.functional.linear(x, weight), torch.nn.functional.linear(x, sparse),
                                   rtol=1e-2, atol=1e-1)
            out[f"{name}, {n} tokens"] = {"dense_ms": dense_s * 1e3, "sparse_ms": sparse_s * 1e3,
                                          "speedup": dense_s / sparse_s, "same_output": bool(close)}
    return out


def bench_gpu(methods=("tamp", "wanda"), blocks: int = FULL_BLOCKS, samples: int = FULL_SAMPLES) -> dict:
    if not torch.cuda.is_available():
        return {"skipped": "not measured: no GPU in this session"}
    out = {"device": torch.cuda.get_device_name(0), "total_memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30}
    for method in methods:
        out[method] = prune_whole_decoder(method, blocks, samples)
        torch.cuda.empty_cache()
    out["semi_structured_2of4"] = semi_structured_speedup()
    return out


if __name__ == "__main__":  # a quick check on a GPU machine: python -m bench.gpu [blocks] [samples]
    import json
    import sys

    args = [int(a) for a in sys.argv[1:3]]
    print(json.dumps(bench_gpu(("tamp", "wanda"), *args), indent=1, default=str))
