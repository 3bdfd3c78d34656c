"""Decoder blocks whose weights accelerate keeps offloaded (a model placed with a `device_map` that
sends some blocks to "cpu" or "disk", `dispatch_model`, `cpu_offload`): their parameters are on
the meta device and a hook loads them for each forward.

The driver works on one block at a time: `materialized` loads that block's weights from the
offload store onto the compute device, turns the hooks' per-forward loading off while the block
is pruned, then writes the pruned weights back into the store and returns the parameters to the
meta device, so only one block's weights are ever in memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _offload_hooks(block: nn.Module) -> list[tuple[nn.Module, object]]:
    """(module, hook) for every accelerate hook inside `block` that offloads weights."""
    found = []
    for module in block.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
            if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
                found.append((module, h))
    return found


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
    else:
        store[key] = tensor


@contextmanager
def materialized(block: nn.Module, device, keep_changes: bool = True) -> Iterator[nn.Module]:
    """Real weights for an accelerate-offloaded block inside the context (no-op otherwise)."""
    offloaded = _offload_hooks(block)
    if not offloaded:
        yield block
        return
    from accelerate.utils import set_module_tensor_to_device

    names: list[list[str]] = []
    # The hooks move a forward's inputs to their execution device; the weights now sit on `device`
    # (e.g. a GPU while the store was dispatched for the CPU), so inputs must follow them there.
    execution_devices = [hook.execution_device for _, hook in offloaded]
    for module, hook in offloaded:
        hook.execution_device = torch.device(device)
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
        for (module, hook), tensors, execution_device in zip(offloaded, names, execution_devices):
            for name in tensors:
                if keep_changes:
                    value = module._parameters.get(name)
                    value = module._buffers[name] if value is None else value
                    _write_back(hook.weights_map, name, value.detach().to("cpu"))
                set_module_tensor_to_device(module, name, "meta")
            hook.offload = True
            hook.execution_device = execution_device
