"""The sequential block-by-block driver shared by every method.

For each decoder block: move it to the compute device, run every calibration sample through it
with hooks on its linears (a visitor collects statistics), let the visitor prune, then run the
pruned block again to produce the next block's inputs. Only one block is on the device at a time;
the captured states may stay on the CPU. A visitor may ask for one more dense pass, without hooks,
before the statistics (ATV ranks tokens by a drift averaged over all samples).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from mmprune.prune.calibration import CalibrationStore, check_finite
from mmprune.place.offload import materialized, sample_weights


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """The block's linear layers by their name inside the block (q, k, v, o, gate, up, down)."""
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # transformers < 4.54 returned a tuple


class LinearTaps:
    """Forward hooks that keep the current sample's input (and optionally output) of each linear,
    as (tokens x features) views; cleared after each sample."""

    def __init__(self, linears: dict[str, nn.Linear], keep_outputs: bool):
        self.linears = linears
        self.keep_outputs = keep_outputs
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._paused = False

    @contextmanager
    def paused(self):
        """Calls of the linears outside the block forward (e.g. the attention row) are not kept."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _hook(self, name: str):
        def hook(module, args, output):
            if self._paused:
                return
            x = args[0]
            self.inputs[name] = x.reshape(-1, x.shape[-1]).detach()
            if self.keep_outputs:
                self.outputs[name] = output.reshape(-1, output.shape[-1]).detach()

        return hook

    def __enter__(self) -> "LinearTaps":
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self.clear()

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()


class BlockVisitor(Protocol):
    keep_outputs: bool  # whether observe() needs the linears' outputs
    modifies_block: bool  # whether end_block() changes the weights (then a second pass runs)

    def begin_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> None: ...

    def observe(self, index: int, sample: int, block_input: torch.Tensor, block_output: torch.Tensor,
                taps: LinearTaps, modality_ids: torch.Tensor, kwargs: dict) -> None: ...

    def end_block(self, index: int, block: nn.Module, linears: dict[str, nn.Linear]) -> None: ...

    # optional: a visitor with `prescans = True` also gets prescan(index, sample, block_input,
    # block_output, modality_ids) for every sample, then end_prescan(index), before observe()


@contextmanager
def on_device(module: nn.Module, device: torch.device | str, keep_changes: bool = True):
    """Temporarily move a module to the compute device (no-op when it is already there). A block
    that accelerate keeps offloaded (device_map with "cpu"/"disk") is loaded from its offload store
    instead, and its changed weights written back on exit (`keep_changes`)."""
    with materialized(module, device, keep_changes):
        first = next(module.parameters(), None)
        home = first.device if first is not None else torch.device(device)
        moved = home != torch.device(device)
        if moved:
            module.to(device)
        sample_weights()  # the block is now in memory on `device`
        try:
            yield module
        finally:
            if moved:
                module.to(home)


@torch.no_grad()
def sweep(
    blocks: nn.ModuleList,
    store: CalibrationStore,
    visitor: BlockVisitor,
    device: torch.device | str,
    desc: str,
) -> None:
    """Visit every block in order; `store` ends holding the last block's outputs."""
    for index, block in enumerate(tqdm(blocks, desc=desc, unit="block")):
        with on_device(block, device, keep_changes=visitor.modifies_block):
            linears = block_linears(block)
            visitor.begin_block(index, block, linears)
            if getattr(visitor, "prescans", False):
                # a dense pass before the statistics, for a rule that needs every sample's output first (ATV)
                for sample in range(len(store)):
                    hidden, kwargs = store.inputs(sample, device)
                    visitor.prescan(index, sample, hidden, block_output(block, hidden, kwargs),
                                    store.modality_ids[sample].to(device))
                visitor.end_prescan(index)
            with LinearTaps(linears, visitor.keep_outputs) as taps:
                for sample in tqdm(range(len(store)), desc=f"block {index}", unit="sample", leave=False):
                    hidden, kwargs = store.inputs(sample, device)
                    out = block_output(block, hidden, kwargs)
                    visitor.observe(index, sample, hidden, out, taps, store.modality_ids[sample].to(device), kwargs)
                    taps.clear()
                    if not visitor.modifies_block:
                        _store_output(store, sample, out, index)
            visitor.end_block(index, block, linears)
            if visitor.modifies_block:
                for sample in range(len(store)):
                    hidden, kwargs = store.inputs(sample, device)
                    _store_output(store, sample, block_output(block, hidden, kwargs), index)


def _store_output(store: CalibrationStore, sample: int, out: torch.Tensor, index: int) -> None:
    check_finite(out, f"the output of decoder block {index} for calibration sample {sample}")
    store.hidden[sample] = out.to(store.device)
