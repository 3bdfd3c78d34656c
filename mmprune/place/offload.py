"""Models placed by accelerate (a `device_map` over GPUs, the CPU and disk; `dispatch_model`,
`cpu_offload`): blocks on another device than the compute device, or offloaded (parameters on the
meta device, a hook loading them from a CPU or disk store for each forward).

The driver works on one block at a time: `materialized` points the block's hooks at the compute
device, loads an offloaded block's weights from its store, turns the hooks' per-forward loading
off while the block is pruned, then writes the pruned weights back into the store and returns
the parameters to the meta device, so only one block's weights are ever brought in.

`WeightMeter` measures what the placement is for: the bytes of weights held in memory on each
device at their high-water mark, and the bytes read from and written to the offload stores.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

_meter: "WeightMeter | None" = None  # the run's meter; module-level so the driver needs no extra argument


def _hooks(block: nn.Module) -> list[tuple[nn.Module, object]]:
    """(module, hook) for every accelerate hook inside `block` that places its module's forward."""
    found = []
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
            if hasattr(h, "execution_device"):
                found.append((module, h))
    return found


def _offloads(hook) -> bool:
    return bool(getattr(hook, "offload", False)) and getattr(hook, "weights_map", None) is not None


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate placed `model` (hooks move each forward's inputs to its module's device)."""
    return any(getattr(m, "_hf_hook", None) is not None for m in model.modules())


def main_device(model: nn.Module) -> torch.device:
    """Where a dispatched model's forward takes its inputs (its root hook's device), else where its
    first real parameter lives."""
    root = getattr(model, "_hf_hook", None)
    for hook in getattr(root, "hooks", [root]) if root is not None else []:
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for param in model.parameters():
        if not param.is_meta:
            return param.device
    return torch.device("cpu")


def offloaded_value(model: nn.Module, name: str) -> torch.Tensor:
    """An offloaded (meta) parameter's or buffer's value, read from the store of the innermost
    hook that holds it (the meter counts a disk read)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:cut])), "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
            weights_map = getattr(h, "weights_map", None)
            if weights_map is not None:
                return weights_map[".".join(parts[cut:])]
    raise RuntimeError(f"{name} is on the meta device but no accelerate hook holds its value")


def _write_back(weights_map, name: str, tensor: torch.Tensor) -> None:
    """Store a changed tensor where the hook reads it from next time. Disk stores get a new .dat
    file in their offload folder (a weight read from the original checkpoint file is never
    written over: the index then points at the new file)."""
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    key = weights_map.prefix + name
    store = weights_map.dataset
    if isinstance(store, OffloadedWeightsLoader):
        if key in store.state_dict or store.save_folder is None:
            store.state_dict[key] = tensor
        else:
            offload_weight(tensor, key, store.save_folder, index=store.index)
            if _meter is not None:
                _meter.written_bytes += tensor.numel() * tensor.element_size()
    else:
        store[key] = tensor


@contextmanager
def materialized(block: nn.Module, device, keep_changes: bool = True) -> Iterator[nn.Module]:
    """Real weights on `device` for a block accelerate placed (no-op for a plain block): its hooks
    run the block on `device`, offloaded weights are loaded and written back on exit."""
    hooks = _hooks(block)
    if not hooks:
        yield block
        return
    from accelerate.utils import set_module_tensor_to_device

    offloaded = [(module, hook) for module, hook in hooks if _offloads(hook)]
    # the hooks move a forward's inputs to their execution device; the weights now sit on `device`
    # (e.g. a GPU while the block was dispatched to another GPU or the CPU), so inputs must follow
    execution_devices = [hook.execution_device for _, hook in hooks]
    for _, hook in hooks:
        hook.execution_device = torch.device(device)
    names: list[list[str]] = []
    for module, hook in offloaded:
        tensors = [n for n, _ in module.named_parameters(recurse=False)]
        if hook.offload_buffers:
            tensors += [n for n, _ in module.named_buffers(recurse=False)]
        names.append(tensors)
        for name in tensors:
            set_module_tensor_to_device(module, name, device, value=hook.weights_map[name])
        hook.offload = False  # forwards now use these tensors instead of reloading the stored ones
    try:
        yield block
    finally:
        for (module, hook), tensors in zip(offloaded, names):
            for name in tensors:
                if keep_changes:
                    value = module._parameters.get(name)
                    value = module._buffers[name] if value is None else value
                    _write_back(hook.weights_map, name, value.detach().to("cpu"))
                set_module_tensor_to_device(module, name, "meta")
            hook.offload = True
        for (_, hook), execution_device in zip(hooks, execution_devices):
            hook.execution_device = execution_device


def _device_name(device) -> str:
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


class WeightMeter:
    """Weights in memory per device, at their high-water mark, and offload traffic.

    A sample sums the distinct storages (by device and address) of the model's parameters and
    buffers that are not on the meta device, of the in-memory offload stores (CPU offload) and of
    the copies the run made and still holds (`track`: weights read from disk, copies written out
    while saving). Samples are taken after every change that adds memory (load, a block brought
    to the compute device, a weight read from disk, a copy made for saving), so the high-water
    mark of these bytes is exact, not sampled in time, and the same on every run."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.peak: dict[str, int] = {}
        self.read_bytes = {"offload_folder": 0, "checkpoint": 0}
        self.written_bytes = 0
        self._copies: list[tuple[StorageWeakRef, str, int, int]] = []  # (ref, device, address, bytes)
        self.copies_peak = 0  # most bytes of tracked copies alive at once since `reset_copies`
        self._stores = self._memory_stores()

    def _memory_stores(self) -> list[dict]:
        from accelerate.utils import OffloadedWeightsLoader

        stores, seen = [], set()
        for _, hook in _hooks(self.model):
            weights_map = getattr(hook, "weights_map", None)
            store = getattr(weights_map, "dataset", weights_map)
            memory = store.state_dict if isinstance(store, OffloadedWeightsLoader) else store
            if isinstance(memory, dict) and id(memory) not in seen:
                seen.add(id(memory))
                stores.append(memory)
        return stores

    def track(self, tensor: torch.Tensor) -> None:
        """A copy of weights the run made (read from disk, converted for saving): held until freed."""
        if tensor.is_meta:
            return
        storage = tensor.untyped_storage()
        self._copies.append((StorageWeakRef(storage), _device_name(tensor.device), storage.data_ptr(),
                             storage.nbytes()))
        self.sample()

    def read(self, tensor: torch.Tensor, source: str) -> None:
        self.read_bytes[source] += tensor.numel() * tensor.element_size()
        self.track(tensor)

    def reset_copies(self) -> None:
        self.copies_peak = 0

    def _live_copies(self) -> list[tuple[str, int, int]]:
        self._copies = [c for c in self._copies if not c[0].expired()]
        return [(device, address, nbytes) for _, device, address, nbytes in self._copies]

    def sample(self) -> dict[str, int]:
        held: dict[tuple[str, int], int] = {}
        tensors = [t for _, t in self.model.named_parameters()] + [t for _, t in self.model.named_buffers()]
        tensors += [t for store in self._stores for t in store.values() if torch.is_tensor(t)]
        for tensor in tensors:
            if tensor.is_meta:
                continue
            storage = tensor.untyped_storage()
            held[(_device_name(tensor.device), storage.data_ptr())] = storage.nbytes()
        copies = self._live_copies()
        copied: dict[tuple[str, int], int] = {}
        for device, address, nbytes in copies:
            if (device, address) not in held:  # a copy that became a parameter is counted once
                copied[(device, address)] = nbytes
        self.copies_peak = max(self.copies_peak, sum(copied.values()))
        now: dict[str, int] = {}
        for (device, _), nbytes in [*held.items(), *copied.items()]:
            now[device] = now.get(device, 0) + nbytes
        for device, nbytes in now.items():
            self.peak[device] = max(self.peak.get(device, 0), nbytes)
        return now


def current_meter() -> WeightMeter | None:
    return _meter


def sample_weights() -> None:
    if _meter is not None:
        _meter.sample()


def track_copy(tensor: torch.Tensor) -> None:
    if _meter is not None:
        _meter.track(tensor)


def folder_bytes(folder) -> int:
    """Bytes of the files under `folder` (0 for None): what loading wrote into an offload folder."""
    if not folder:
        return 0
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names)


@contextmanager
def metering(model: nn.Module, written_before: int = 0) -> Iterator[WeightMeter]:
    """Measure `model`'s weights in memory and its offload traffic for the duration of the context;
    the offload stores' disk reads are counted from here on, writes from `written_before` (what
    loading already wrote into the offload folder)."""
    global _meter
    previous = _meter
    _meter = WeightMeter(model)
    _meter.written_bytes = written_before
    _meter_stores(model, _meter)
    _meter.sample()
    try:
        yield _meter
    finally:
        _meter = previous


def _meter_stores(model: nn.Module, meter: WeightMeter) -> None:
    """Give every disk store of the model's hooks a reader that reports to `meter`."""
    from accelerate.utils import OffloadedWeightsLoader
    from accelerate.utils.offload import PrefixedDataset

    metered: dict[int, OffloadedWeightsLoader] = {}
    for _, hook in _hooks(model):
        weights_map = getattr(hook, "weights_map", None)
        if not isinstance(weights_map, PrefixedDataset) or not isinstance(weights_map.dataset, OffloadedWeightsLoader):
            continue
        store = weights_map.dataset
        if isinstance(store, _MeteredWeightsLoader):
            store.meter = meter
            continue
        if id(store) not in metered:
            metered[id(store)] = _MeteredWeightsLoader(store, meter)
        weights_map.dataset = metered[id(store)]


def _offload_loader_base():
    from accelerate.utils import OffloadedWeightsLoader

    return OffloadedWeightsLoader


class _MeteredWeightsLoader(_offload_loader_base()):
    """accelerate's disk store, counting what each read brings into memory."""

    def __init__(self, source, meter: WeightMeter):
        # share the source's dicts: write-backs through either are seen by both
        self.state_dict, self.save_folder, self.index = source.state_dict, source.save_folder, source.index
        self.all_keys, self.device = source.all_keys, source.device
        self.meter = meter

    def __getitem__(self, key: str):
        value = super().__getitem__(key)
        if key not in self.state_dict:
            info = self.index[key]
            in_folder = self.save_folder is not None and (
                info.get("safetensors_file") is None
                or os.path.abspath(info["safetensors_file"]).startswith(os.path.abspath(self.save_folder) + os.sep))
            self.meter.read(value, "offload_folder" if in_folder else "checkpoint")
        return value
