"""Models placed by accelerate (a `device_map` over GPUs, the CPU and disk; `dispatch_model`,
`cpu_offload`): blocks on another device than the compute device, or offloaded (parameters on the
meta device, a hook loading them from a CPU or disk store for each forward).

The driver works on one block at a time: `materialized` points the block's hooks at the compute
device, loads an offloaded block's weights from its store, turns the hooks' per-forward loading
off while the block is pruned, then writes the pruned weights back into the store and returns
the parameters to the meta device, so only one block's weights are ever brought in.

Tied weights (an output head sharing the input embedding's matrix, as in SmolLM2, Qwen2-0.5B or
Llama-3.2-1B) are stored once, under the name of the weight they share: `bind_tied_weights` makes
every read of a tied name go to that entry, and `materialized` brings such a weight in, and writes
it back, once.

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


def _store_entry(model: nn.Module, name: str, offloading: bool = False):
    """(weights_map, name inside it) of the innermost hook that holds the offloaded tensor `name`;
    with `offloading`, of the innermost hook that loads it for each forward, or None."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:cut])), "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
            weights_map = getattr(h, "weights_map", None)
            if weights_map is not None and (_offloads(h) or not offloading):
                return weights_map, ".".join(parts[cut:])
    if offloading:
        return None
    raise RuntimeError(f"{name} is on the meta device but no accelerate hook holds its value")


def offloaded_value(model: nn.Module, name: str) -> torch.Tensor:
    """An offloaded (meta) parameter's or buffer's value, read from the store of the innermost
    hook that holds it (the meter counts a disk read)."""
    weights_map, rest = _store_entry(model, name)
    return weights_map[rest]


def _stored_key(weights_map, name: str) -> tuple[int, str]:
    """(store, key) under which a hook's tensor `name` is kept: tied names resolve to the name
    they share, so two hooks reading one tied weight give the same pair."""
    from accelerate.utils.offload import PrefixedDataset

    if isinstance(weights_map, PrefixedDataset):
        store, key = weights_map.dataset, weights_map.prefix + name
        return id(store), store.stored_name(key) if isinstance(store, _Store) else key
    return id(weights_map), name


def _write_back(weights_map, name: str, tensor: torch.Tensor) -> None:
    """Store a changed tensor where the hook reads it from next time. Disk stores get a new .dat
    file in their offload folder (a weight read from the original checkpoint file is never
    written over: the index then points at the new file)."""
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    key = weights_map.prefix + name
    store = weights_map.dataset
    if isinstance(store, _Store):
        key = store.stored_name(key)
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
    run the block on `device`, offloaded weights are loaded and written back on exit. A weight
    that several of the block's modules share (tied) is read once, is one tensor in all of them,
    and is written back once."""
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
    brought: dict[tuple[int, str], tuple[nn.Module, str, object]] = {}  # stored weight -> first holder
    for module, hook in offloaded:
        tensors = [n for n, _ in module.named_parameters(recurse=False)]
        if hook.offload_buffers:
            tensors += [n for n, _ in module.named_buffers(recurse=False)]
        names.append(tensors)
        for name in tensors:
            ref = _stored_key(hook.weights_map, name)
            if ref in brought:  # tied: the tensor already brought in for another module
                holder, holder_name, _ = brought[ref]
                _share(module, name, holder, holder_name)
                continue
            set_module_tensor_to_device(module, name, device, value=hook.weights_map[name])
            brought[ref] = (module, name, hook.weights_map)
        hook.offload = False  # forwards now use these tensors instead of reloading the stored ones
    try:
        yield block
    finally:
        if keep_changes:
            for module, name, weights_map in brought.values():
                value = module._parameters.get(name)
                value = module._buffers[name] if value is None else value
                _write_back(weights_map, name, value.detach().to("cpu"))
        for (module, hook), tensors in zip(offloaded, names):
            for name in tensors:
                set_module_tensor_to_device(module, name, "meta")
            hook.offload = True
        for (_, hook), execution_device in zip(hooks, execution_devices):
            hook.execution_device = execution_device


def _share(module: nn.Module, name: str, holder: nn.Module, holder_name: str) -> None:
    """Give `module` the tensor `holder` holds (the same parameter object: a tie)."""
    if holder_name in holder._parameters:
        module._parameters[name] = holder._parameters[holder_name]
    else:
        module._buffers[name] = holder._buffers[holder_name]


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
    """Give every store of the model's hooks a reader that reports to `meter`."""
    for store in _own_stores(model):
        store.meter = meter


def _own_stores(model: nn.Module) -> list["_Store"]:
    """The stores of the model's hooks, each replaced (once, in every hook that shares it) by a
    `_Store` over the same dicts."""
    from accelerate.utils import OffloadedWeightsLoader
    from accelerate.utils.offload import PrefixedDataset

    own: dict[int, _Store] = {}
    for _, hook in _hooks(model):
        weights_map = getattr(hook, "weights_map", None)
        if not isinstance(weights_map, PrefixedDataset):
            continue
        store = weights_map.dataset
        if isinstance(store, _Store):
            own.setdefault(id(store), store)
        elif isinstance(store, (OffloadedWeightsLoader, dict)):
            if id(store) not in own:
                own[id(store)] = _Store(store)
            weights_map.dataset = own[id(store)]
    return list({id(s): s for s in own.values()}.values())


def tied_weights(model: nn.Module) -> dict[str, str]:
    """Tied weight name -> the name of the weight it shares, which checkpoints and offload stores
    hold: transformers' `all_tied_weights_keys` for its models, else the parameters that several
    modules hold (the first name `named_parameters` gives is the one held). Read it before
    accelerate dispatches a model that is not a transformers model: its hooks give each module its
    own meta tensor."""
    declared = getattr(model, "all_tied_weights_keys", None)
    if isinstance(declared, dict):
        return dict(declared)
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            ties[name] = first[id(param)]
        else:
            first[id(param)] = name
    return ties


def bind_tied_weights(model: nn.Module, ties: dict[str, str] | None = None) -> None:
    """After accelerate placed `model`: every tied weight that its hooks offload is read from, and
    written back to, the one store entry of the weight it shares (accelerate looks it up under its
    own name, which the store need not hold), and the model's modules hold one tensor again. A
    tie split between memory and an offload store cannot be one tensor: refused."""
    from mmprune.base.errors import UserInputError

    ties = tied_weights(model) if ties is None else ties
    if not ties or not is_dispatched(model):
        return
    _own_stores(model)
    for name, shared in ties.items():
        where = [_store_entry(model, name, offloading=True), _store_entry(model, shared, offloading=True)]
        if where == [None, None]:
            continue  # both in memory, one tensor
        stores = {id(w[0].dataset) for w in where if w is not None}
        if None in where or len(stores) > 1:
            held = " and ".join(f"{n} {'offloaded' if w else 'in memory'}" for n, w in zip((name, shared), where))
            raise UserInputError(f"{name} is tied to {shared}, but the placement keeps them apart ({held}); "
                                 "place both modules on one device")
        (weights_map, rest), (shared_map, shared_rest) = where
        store = weights_map.dataset
        if not isinstance(store, _Store):
            raise RuntimeError(f"{name} is offloaded to a store mmprune does not know ({type(store).__name__})")
        store.tie(weights_map.prefix + rest, shared_map.prefix + shared_rest)
    share_tied_weights(model, ties)


def share_tied_weights(model: nn.Module, ties: dict[str, str] | None = None) -> None:
    """Give each offloaded tied name the parameter object of the weight it shares again: an
    accelerate hook gives its module a meta tensor of its own after each forward, and code that
    finds ties by identity (transformers' save) would see two weights."""
    for name, shared in (tied_weights(model) if ties is None else ties).items():
        value, source = model.get_parameter(name), model.get_parameter(shared)
        if value is not source and value.is_meta and source.is_meta:
            owner, _, attr = name.rpartition(".")
            holder, _, holder_attr = shared.rpartition(".")
            _share(model.get_submodule(owner), attr, model.get_submodule(holder), holder_attr)


def _offload_loader_base():
    from accelerate.utils import OffloadedWeightsLoader

    return OffloadedWeightsLoader


class _Store(_offload_loader_base()):
    """accelerate's offload store (tensors in memory, or files indexed by name) over the same
    dicts, with tied names read from the entry of the weight they share, and each read from a
    file counted by the run's meter."""

    def __init__(self, source):
        # share the source's dicts: write-backs through either are seen by both
        if isinstance(source, dict):  # a plain state dict (cpu_offload)
            source = _offload_loader_base()(state_dict=source)
        self.state_dict, self.save_folder, self.index = source.state_dict, source.save_folder, source.index
        self.all_keys, self.device = source.all_keys, source.device
        self.shared: dict[str, str] = {}  # tied name -> the stored name it reads
        self.meter: WeightMeter | None = None

    def stored_name(self, key: str) -> str:
        return self.shared.get(key, key)

    def tie(self, key: str, stored: str) -> None:
        """Read `key` from `stored` from now on; an entry of its own (an alias) is dropped, so
        that the weight is held, and written back, once."""
        if stored not in self.state_dict and stored not in self.index:
            raise RuntimeError(f"the offload store holds no {stored}, which {key} is tied to")
        self.shared[key] = stored
        self.state_dict.pop(key, None)
        if key in self.index:
            del self.index[key]
        if key in self.all_keys:
            self.all_keys.remove(key)

    def __getitem__(self, key: str):
        key = self.stored_name(key)
        value = super().__getitem__(key)
        if self.meter is not None and key not in self.state_dict:
            info = self.index[key]
            in_folder = self.save_folder is not None and (
                info.get("safetensors_file") is None
                or os.path.abspath(info["safetensors_file"]).startswith(os.path.abspath(self.save_folder) + os.sep))
            self.meter.read(value, "offload_folder" if in_folder else "checkpoint")
        return value
