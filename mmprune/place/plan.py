"""Where a pruning run's weights go and the memory it should peak at, from config.json alone.

    python -m mmprune.place.plan --model_path DIR [--max_memory 0:20GiB,cpu:60GiB] [--device_map auto]
                           [--method tamp] [--nsamples 128] [--seqlen 2048] [--dtype bfloat16]

The model is built on the meta device (no weight is read) and accelerate's
`infer_auto_device_map` places it, decoder blocks and tower layers unsplit, in what each device's
--max_memory leaves after the run's own working memory (below), so the peak fits. The peak is an
estimate of the sequential driver: the weights placed on each device, plus on the compute device
one decoder block loaded from the CPU or disk, the calibration hidden states (inputs and outputs
of a block, float of the run's dtype; on the CPU with --offload_activations), one sample's
float32 forward working set and the method's statistics (SparseGPT: one float32 Hessian per
distinct block input and two factorisation copies of the largest; the Wanda family: per-column
norms, negligible). Saving writes one shard at a time, so the CPU also holds one shard.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mmprune.base.adapters import adapter_for_checkpoint
from mmprune.base.entry import OneLineErrorParser, run_main
from mmprune.base.errors import UserInputError
from mmprune.base.presets import PRESETS
from mmprune.place.options import DEVICE_MAP_MODES, parse_device_map, parse_max_memory, parse_size

GiB = 1024 ** 3
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MemoryPlan:
    model: str
    dtype: str
    placement: dict[str, str]                 # module group -> device
    weights: dict[str, int]                   # device -> bytes of weights placed there
    peak: dict[str, int]                      # device -> expected peak bytes
    compute_device: str
    block_bytes: int
    activation_bytes: int
    method_bytes: int
    blocks_per_device: dict[str, int] = field(default_factory=dict)
    over_budget: dict[str, int] = field(default_factory=dict)
    limits: dict[str, int] = field(default_factory=dict)     # device -> --max_memory (or what it has)
    reserve: dict[str, int] = field(default_factory=dict)    # device -> working memory set aside
    device_map: dict = field(default_factory=dict)           # module -> device, as accelerate takes it


@contextmanager
def _quiet_accelerate():
    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _device_name(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def empty_model(model_path) -> tuple[nn.Module, str, list[str]]:
    """(model on the meta device, model_type, module classes accelerate must not split). The model
    family's adapter builds it (mmprune.base.adapters), so the planner knows no family by name."""
    from accelerate import init_empty_weights

    adapter = adapter_for_checkpoint(model_path)
    # everything made on the meta device: a weight tied in the constructor stays one parameter, so
    # accelerate counts it once and places its modules together (with buffers kept real, each
    # parameter assignment would make a new one)
    with init_empty_weights(include_buffers=True):
        model = adapter.empty_model(Path(model_path))
    model_type = adapter.model_type
    # every element of a `layers` list stays whole: decoder blocks and tower layers
    unsplit = sorted({type(m).__name__ for name, lst in model.named_modules() if name.endswith("layers")
                      and isinstance(lst, nn.ModuleList) for m in lst})
    return model, model_type, unsplit


def _decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best = None
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and "vision" not in name \
                and "audio" not in name and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise UserInputError("no decoder block list found in the model")
    return best


def device_of(name: str, device_map: dict) -> object:
    """The device `device_map` gives the module or weight `name` (its closest listed ancestor)."""
    while True:
        if name in device_map:
            return device_map[name]
        if "." not in name:
            return device_map.get("", "cpu")
        name = name.rsplit(".", 1)[0]


def _uncovered(model: nn.Module, device_map: dict) -> list[str]:
    """Parameters and buffers that no entry of `device_map` places."""
    if "" in device_map:
        return []
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    missing = []
    for name in names:
        parts = name.split(".")
        if not any(".".join(parts[:i]) in device_map for i in range(1, len(parts) + 1)):
            missing.append(name)
    return missing


def disjoint_map(model: nn.Module, device_map: dict) -> dict:
    """The same placement with no entry inside another (accelerate's hooks need that): a module
    listed together with some of its parts (e.g. "" for the rest) is replaced by its other parts."""
    out = dict(device_map)
    while True:
        nested = sorted((k for k in out if any(o != k and (k == "" or o.startswith(k + ".")) for o in out)),
                        key=lambda k: k.count(".") + bool(k))
        if not nested:
            return out
        name = nested[0]
        device = out.pop(name)
        module = model.get_submodule(name)
        parts = [n for n, _ in module.named_children()] + [n for n, _ in module.named_parameters(recurse=False)] \
            + [n for n, _ in module.named_buffers(recurse=False)]
        for part in parts:
            out.setdefault(f"{name}.{part}" if name else part, device)


def check_ties_together(model: nn.Module, device_map: dict) -> None:
    """Tied weights are one tensor (stored once): their modules need one device."""
    from accelerate.utils import find_tied_parameters

    for group in find_tied_parameters(model):
        devices = {name: device_of(name, device_map) for name in group}
        if len(set(map(str, devices.values()))) > 1:
            shown = ", ".join(f"{name.rsplit('.', 1)[0]} on {device}" for name, device in devices.items())
            raise UserInputError(f"--device_map splits weights that are tied (one tensor): {shown}; give these "
                                 "modules the same device")


def make_plan(model_path, max_memory=None, device_map="auto", dtype="bfloat16", method="tamp",
              nsamples: int = 128, seqlen: int = 2048, offload_activations: bool = False,
              shard_bytes: int = 5 * GiB, compute_device=None, longest: int | None = None) -> MemoryPlan:
    """Place the weights in what --max_memory leaves after the run's working memory (so the peak,
    not just the weights, fits each device) and estimate each device's peak. `seqlen` is the mean
    tokens per calibration sample (the hidden states), `longest` the longest (one sample's forward;
    default `seqlen`); `compute_device` (a GPU index or "cpu") defaults to the first GPU."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory

    model, kind, unsplit = empty_model(model_path)
    torch_dtype = _DTYPES[dtype]
    sizes = compute_module_sizes(model, dtype=torch_dtype)
    prefix, blocks = _decoder_blocks(model)
    block_bytes = max(sizes[f"{prefix}.{i}"] for i in range(len(blocks)))
    linears = [m for m in blocks[0].modules() if isinstance(m, nn.Linear)]
    hidden = linears[0].in_features
    widest = max(max(m.in_features, m.out_features) for m in linears)
    act_bytes = 2 * nsamples * seqlen * hidden * torch.tensor([], dtype=torch_dtype).element_size()
    working = 4 * (longest or seqlen) * widest * 4  # float32 taps of one sample's forward
    if PRESETS.get(method, (None, method))[1] == "sparsegpt":  # a method name, or a pruner ("sparsegpt")
        inputs = {m.in_features for m in linears}
        distinct = 3 * hidden ** 2 + sum(c ** 2 for c in inputs if c != hidden)  # q/k/v, o, gate/up share
        method_bytes = 4 * distinct + 2 * 4 * max(inputs) ** 2
    else:
        method_bytes = 4 * sum(m.in_features for m in linears) * 2
    shard = min(shard_bytes, sizes[""])  # saving holds one shard in CPU memory at a time

    with _quiet_accelerate():  # planning for GPUs this machine lacks is the point
        limits = get_max_memory(dict(max_memory) if max_memory else None)
    gpus = sorted(k for k in limits if isinstance(k, int))
    compute = compute_device if compute_device is not None else (gpus[0] if gpus else "cpu")
    # what the compute device and the CPU need besides the weights placed on them
    reserve = {compute: block_bytes + working + method_bytes + (0 if offload_activations else act_bytes)}
    reserve["cpu"] = reserve.get("cpu", 0) + shard + block_bytes + (act_bytes if offload_activations else 0)
    budget = {k: max(v - reserve.get(k, 0), 0) if k != "disk" else v for k, v in limits.items()}
    if isinstance(device_map, dict):
        placement = dict(device_map)
        # modules, and weights held directly by a split module (LLaVA-NeXT's image_newline)
        known = {*dict(model.named_modules()), *dict(model.named_parameters()), *dict(model.named_buffers())}
        unknown = [name for name in placement if name and name not in known]
        if unknown:
            raise UserInputError(f"--device_map names modules the model lacks: {', '.join(unknown[:5])}")
        missing = _uncovered(model, placement)
        if missing:
            raise UserInputError(f"--device_map places no device for {len(missing)} weights of the model (e.g. "
                                 f"{', '.join(missing[:3])}); add their modules, or an entry \"\" for the rest")
        placement = disjoint_map(model, placement)
        check_ties_together(model, placement)
    else:
        with _quiet_accelerate():
            if device_map in ("auto", "balanced") and len(gpus) > 1:
                budget = get_balanced_memory(model, budget, no_split_module_classes=unsplit, dtype=torch_dtype)
            placement = infer_auto_device_map(model, max_memory=dict(budget), no_split_module_classes=unsplit,
                                              dtype=torch_dtype)
    weights: dict[str, int] = {}
    for name, device in placement.items():
        weights[_device_name(device)] = weights.get(_device_name(device), 0) + sizes[name]
    per_device: dict[str, int] = {}
    for i in range(len(blocks)):
        dev = _device_name(device_of(f"{prefix}.{i}", placement))
        per_device[dev] = per_device.get(dev, 0) + 1
    compute_name = _device_name(compute)
    streamed = any(dev != compute_name for dev in per_device)
    peak = {dev: b for dev, b in weights.items() if dev != "disk"}
    peak[compute_name] = peak.get(compute_name, 0) + (block_bytes if streamed else 0) + working + method_bytes \
        + (0 if offload_activations else act_bytes)
    peak["cpu"] = peak.get("cpu", 0) + shard + (act_bytes if offload_activations else 0) \
        + (block_bytes if "disk" in per_device else 0)
    named_limits = {_device_name(k): v for k, v in limits.items()}
    over = {dev: b - named_limits[dev] for dev, b in peak.items() if dev in named_limits and b > named_limits[dev]}
    groups = {name or "(whole model)": _device_name(device) for name, device in placement.items()}
    return MemoryPlan(str(model_path), dtype, groups, weights, peak, compute_name, block_bytes, act_bytes,
                      method_bytes, per_device, over, named_limits,
                      {_device_name(k): v for k, v in reserve.items()}, dict(placement))


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB" if n >= GiB // 10 else f"{n / 1024 ** 2:8.2f} MiB"


def render(plan: MemoryPlan) -> str:
    lines = [f"model {plan.model} ({plan.dtype}); compute device {plan.compute_device}",
             "decoder blocks per device: " + ", ".join(f"{d} {n}" for d, n in plan.blocks_per_device.items()),
             f"one block {_gib(plan.block_bytes).strip()}, calibration hidden states {_gib(plan.activation_bytes).strip()}, "
             f"method statistics {_gib(plan.method_bytes).strip()}", "",
             f"{'device':<10} {'weights':>12} {'expected peak':>14}"]
    for dev in sorted(set(plan.weights) | set(plan.peak), key=lambda d: (d == "disk", d == "cpu", d)):
        lines.append(f"{dev:<10} {_gib(plan.weights.get(dev, 0)):>12} {_gib(plan.peak[dev]) if dev in plan.peak else '':>14}")
    for dev, extra in plan.over_budget.items():
        lines.append(f"warning: {dev} would exceed its --max_memory by {_gib(extra).strip()}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m mmprune.place.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", required=True, help="checkpoint folder (only config.json is read)")
    parser.add_argument("--max_memory", default=None, help="e.g. 0:20GiB,cpu:60GiB (default: this machine's)")
    parser.add_argument("--device_map", default="auto", help=f"{' | '.join(DEVICE_MAP_MODES)} | FILE.json")
    parser.add_argument("--dtype", default="bfloat16", choices=list(_DTYPES))
    parser.add_argument("--method", default="tamp", choices=sorted(PRESETS),
                        help="what the run prunes with: the OBS presets plan as SparseGPT (its Hessians)")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sample")
    parser.add_argument("--offload_activations", action="store_true")
    parser.add_argument("--max_shard_size", default="5GiB", help="size of the saved weight files")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser.parse_args(argv)


def _main(argv) -> int:
    args = parse_args(argv)
    if args.nsamples < 1 or args.seqlen < 1:
        raise UserInputError("--nsamples and --seqlen must be at least 1")
    plan = make_plan(args.model_path, parse_max_memory(args.max_memory), parse_device_map(args.device_map),
                     args.dtype, args.method, args.nsamples, args.seqlen, args.offload_activations,
                     parse_size(args.max_shard_size, "--max_shard_size"))
    print(json.dumps(asdict(plan), indent=1) if args.json else render(plan))
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
