"""Placement options of a pruning run, parsed and checked before any weight is loaded:
`--device_map auto|balanced|sequential|FILE.json`, `--max_memory 0:20GiB,cpu:60GiB` and
`--offload_folder DIR`. accelerate does the placement; this only turns the options into its
arguments and names what is wrong in one line."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mmprune.base.errors import UserInputError
from mmprune.base.interrupt import signals_deferred
from mmprune.place.options import DEVICE_MAP_MODES, parse_device_map, parse_max_memory

def check_offload_folder(folder: str | None, needed: bool) -> None:
    """An offload folder must be given when something goes to disk, and be writable."""
    if folder is None:
        if needed:
            raise UserInputError("the placement sends weights to disk; pass --offload_folder DIR (or OFFLOAD_FOLDER)")
        return
    path = Path(folder).absolute()
    probe = path if path.exists() else next(p for p in path.parents if p.exists())
    if not probe.is_dir():
        where = "is a file" if probe == path else f"lies below the file {probe}"
        raise UserInputError(f"--offload_folder {folder} {where}; give a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"--offload_folder {folder}: {probe} is not writable")


# ------------------------------------------------------------------------------------ entry points


def add_placement_arguments(parser) -> None:
    group = parser.add_argument_group("placement of models larger than one device (docs/memory-plan.md)")
    group.add_argument("--device_map", default=None,
                       help=f"{' | '.join(DEVICE_MAP_MODES)} | FILE.json (module -> device): place the model with "
                            "accelerate; decoder blocks may go to any GPU, the CPU or disk (default: no placement)")
    group.add_argument("--max_memory", default=None,
                       help="per-device budget the placement keeps to, e.g. 0:20GiB,cpu:60GiB (implies --device_map "
                            "auto); the run's working memory is set aside first")
    group.add_argument("--offload_folder", default=None,
                       help="folder for blocks placed on disk (a private subfolder is made and removed)")
    group.add_argument("--max_shard_size", default=None,
                       help="largest saved weight file, e.g. 5GB (default: as without placement); saving holds "
                            "one shard in CPU memory")


def placement_requested(args) -> bool:
    return any(getattr(args, name, None) for name in ("device_map", "max_memory", "offload_folder"))


def check_devices_exist(keys, where: str) -> None:
    """GPU indices and mps named by the placement must exist on this machine."""
    import torch

    for key in keys:
        if isinstance(key, int):
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if key >= count:
                have = f"{count} CUDA device(s), cuda:0..cuda:{count - 1}" if count else "no CUDA device"
                raise UserInputError(f"{where} names cuda:{key}, but this machine has {have}")
        elif key == "mps" and not torch.backends.mps.is_available():
            raise UserInputError(f"{where} names mps, but no mps device is available here")


def stored_dtype(model_path) -> str:
    """The dtype name config.json stores the weights in (what --dtype auto loads)."""
    try:
        raw = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "float32"
    for cfg in (raw, raw.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            name = str(cfg.get(key) or "").removeprefix("torch.")
            if name in ("float32", "bfloat16", "float16"):
                return name
    return "float32"


def _gib(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 // 10 else f"{n / 1024 ** 2:.2f} MiB"


def compute_key(device: str) -> int | str:
    """--device as make_plan takes it: a GPU index, cpu or mps."""
    import torch

    parsed = torch.device(device)
    if parsed.type == "cuda":
        return parsed.index if parsed.index is not None else 0
    return parsed.type


class Placement:
    """Where a run's weights go (decided by `mmprune.place.plan.make_plan` from config.json before any
    weight is read) and the offload folder it uses."""

    def __init__(self, plan, offload_root: str | None, requested: dict):
        self.plan = plan
        self.offload_root = offload_root
        self.requested = requested
        self.offload_dir: str | None = None  # the run's private folder, set by offload_workspace

    @property
    def device_map(self) -> dict:
        return self.plan.device_map


def plan_placement(args, model_path, *, method: str, nsamples: int, seqlen: int, longest: int, device: str,
                   protected=(), shard_bytes: int | None = None) -> Placement | None:
    """Parse and check the placement flags and decide the device map (None without placement
    flags). Every problem is one UserInputError, raised before any weight is loaded."""
    from mmprune.base.output import check_output_location
    from mmprune.place.plan import make_plan

    if not placement_requested(args):
        return None
    max_memory = parse_max_memory(args.max_memory)
    device_map = parse_device_map(args.device_map) or "auto"
    if max_memory:
        check_devices_exist(max_memory, "--max_memory")
    if isinstance(device_map, dict):
        check_devices_exist(device_map.values(), f"--device_map {args.device_map}")
    dtype = stored_dtype(model_path) if args.dtype == "auto" else args.dtype
    compute = compute_key(device)
    plan = make_plan(model_path, max_memory, device_map, dtype, method, nsamples, max(seqlen, 1),
                     args.offload_activations, shard_bytes if shard_bytes is not None else 5 * 1024 ** 3,
                     compute_device=compute, longest=max(longest, 1))
    if max_memory:
        for name, limit in plan.limits.items():
            if name == "disk":
                continue
            need = max(plan.block_bytes, plan.reserve.get(name, 0))
            if limit < need:
                what = ("one decoder block plus the run's working memory (calibration hidden states, method "
                        "statistics" + (", one saved shard" if name == "cpu" else "") + ")"
                        if plan.reserve.get(name, 0) > plan.block_bytes else "one decoder block")
                raise UserInputError(f"--max_memory gives {name} {_gib(limit)}, less than {what}: {_gib(need)}; "
                                     f"raise it, or leave {name} out")
    for name, extra in plan.over_budget.items():
        sys.stderr.write(f"warning: the placement's expected peak on {name} exceeds its --max_memory by "
                         f"{_gib(extra)}\n")
    uses_disk = "disk" in plan.device_map.values()
    check_offload_folder(args.offload_folder, needed=uses_disk)
    if args.offload_folder:
        check_output_location(args.offload_folder, [p for p in protected if p], "--offload_folder")
        if not uses_disk:
            sys.stderr.write("warning: the placement puts nothing on disk; --offload_folder is not used\n")
    requested = {"device_map": args.device_map, "max_memory": args.max_memory, "offload_folder": args.offload_folder}
    return Placement(plan, args.offload_folder if uses_disk else None, requested)


@contextmanager
def offload_workspace(placement: Placement | None):
    """A private folder inside --offload_folder for this run's offloaded weights, removed at the
    end (also on errors and signals); the folder itself is removed too when this run created it."""
    if placement is None or placement.offload_root is None:
        yield None
        return
    root = Path(placement.offload_root).absolute()
    created = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(prefix="mmprune-offload-", dir=root)
    except OSError as exc:
        raise UserInputError(f"--offload_folder {placement.offload_root}: cannot write there ({exc.strerror or exc})") \
            from None
    placement.offload_dir = folder
    try:
        yield folder
    finally:
        with signals_deferred():
            shutil.rmtree(folder, ignore_errors=True)
            if created:
                try:
                    root.rmdir()
                except OSError:
                    pass  # something else is in it now
        placement.offload_dir = None


def measured_peaks(meter) -> dict[str, dict[str, int]]:
    """Per device: the weights held in memory at their high-water mark (the meter) and what the
    process or device measured (CPU: resident set size high-water; GPUs: torch's allocations)."""
    import torch

    from mmprune.base.memory import peak_rss_bytes

    peaks: dict[str, dict[str, int]] = {}
    for device, nbytes in (meter.peak if meter is not None else {}).items():
        peaks.setdefault(device, {})["weights_peak_bytes"] = nbytes
    peaks.setdefault("cpu", {})["max_rss_bytes"] = peak_rss_bytes()
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            allocated = torch.cuda.max_memory_allocated(index)
            if allocated:
                peaks.setdefault(f"cuda:{index}", {})["max_allocated_bytes"] = allocated
    return peaks


def placement_report(placement: Placement | None, meter, save_copies_peak: int | None) -> dict:
    """The report's `placement` section: what went where, measured peaks, offload traffic."""
    out: dict = {"requested": placement.requested if placement else None}
    if placement is not None:
        plan = placement.plan
        out.update(device_map=plan.placement, blocks_per_device=plan.blocks_per_device,
                   compute_device=plan.compute_device, max_memory_bytes=plan.limits,
                   offload_folder=placement.offload_root,
                   plan={"weights_bytes": plan.weights, "expected_peak_bytes": plan.peak,
                         "block_bytes": plan.block_bytes, "reserve_bytes": plan.reserve})
    else:
        out["device_map"] = None  # the whole model loaded on the CPU, blocks moved to the compute device in turn
    out["peak_memory"] = measured_peaks(meter)
    if meter is not None:
        out["offload_io"] = {"read_bytes": dict(meter.read_bytes), "written_bytes": meter.written_bytes}
    if save_copies_peak is not None:
        out["save_copies_peak_bytes"] = save_copies_peak
    return out
