"""Calibration capture: the inputs of decoder block 0 for every sample, with the call kwargs the
block needs (RoPE cos/sin, masks, positions) and per-token modality ids.

The model-specific side only supplies a function that runs the model's embedding stage for one
sample (vision/audio encoders, projectors, splicing); capture stops the forward at block 0.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from mmprune.base.errors import NonFiniteActivationError


class _StopForward(Exception):
    """Raised inside block 0's pre-hook: everything after it is not needed for capture."""


def _to(value: Any, device: torch.device | str) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


# kwargs of a decoder layer that must not be replayed (cache objects of the captured forward);
# transformers 5.24 renamed the layers' `past_key_values` to `cache`, so any Cache value is dropped too
_DROPPED_KWARGS = ("past_key_values", "past_key_value", "cache", "cache_position")


def _is_cache(value: Any) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # a model without transformers' caches
        return False
    return isinstance(value, Cache)


def move_except(model: nn.Module, keep: nn.Module, device) -> None:
    """Move every parameter and buffer of `model` except those inside `keep` to `device`, so the
    embedding stage runs on the accelerator while the decoder layers stay where they are (the
    driver moves them one at a time). A model accelerate placed is left where it is: its hooks move
    each module's inputs to that module's device, and moving weights under them would split a
    module from its hook."""
    if any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        return
    kept = {id(p) for p in keep.parameters()} | {id(b) for b in keep.buffers()}
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and id(param) not in kept and param.device != torch.device(device):
                module._parameters[key] = nn.Parameter(param.data.to(device), requires_grad=param.requires_grad)
        for key, buf in module._buffers.items():
            if buf is not None and id(buf) not in kept:
                module._buffers[key] = buf.to(device)


def check_finite(tensor: torch.Tensor, where: str) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteActivationError(
            f"{where} holds NaN or inf activations; the checkpoint or dtype overflows on this "
            "data. Try --dtype float32 (or bfloat16 instead of float16), or check the checkpoint"
        )


@dataclass
class CalibrationStore:
    """Hidden states entering the current block, one (1, L, d) tensor per sample.

    `device` is where states live between blocks (the compute device, or "cpu" to offload);
    `kwargs` and `modality_ids` stay fixed across blocks.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    modality_ids: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor | None] = field(default_factory=list)
    device: str = "cpu"

    def __len__(self) -> int:
        return len(self.hidden)

    def inputs(self, index: int, device) -> tuple[torch.Tensor, dict]:
        return self.hidden[index].to(device), _to(self.kwargs[index], device)

    def clone(self) -> "CalibrationStore":
        return CalibrationStore(
            [h.clone() for h in self.hidden], copy.copy(self.kwargs), self.modality_ids, self.labels, self.device
        )

    def token_counts(self, names: Mapping[int, str]) -> dict[str, int]:
        counts = {name: 0 for name in names.values()}
        for ids in self.modality_ids:
            for m, name in names.items():
                counts[name] += int((ids == m).sum())
        return counts


@torch.no_grad()
def capture_block_inputs(
    first_block: nn.Module,
    run_embedding_stage: Callable[[Any], None],
    samples: Iterable[Any],
    modality_ids_of: Callable[[Any], torch.Tensor] | None,
    store_device: str = "cpu",
    labels_of: Callable[[Any], torch.Tensor | None] | None = None,
    total: int | None = None,
    desc: str = "capture calibration inputs",
) -> CalibrationStore:
    """Run the embedding stage of every sample and keep what enters `first_block`.

    `modality_ids_of` gives the per-token ids of a sample; None labels every token 0 (a tower
    whose batch holds several tiles of one sample)."""
    store = CalibrationStore(device=store_device)
    seen: dict[str, Any] = {}

    parameters = list(inspect.signature(first_block.forward).parameters)

    def hook(module, args, kwargs):
        # name positional arguments too (CLIP layers take attention_mask positionally)
        named = dict(zip(parameters, args), **kwargs)
        hidden = named.pop(parameters[0] if parameters[0] in named else "hidden_states")
        kept = {k: v for k, v in named.items() if k not in _DROPPED_KWARGS and not _is_cache(v)}
        if "use_cache" in kept:
            kept["use_cache"] = False
        seen["hidden"], seen["kwargs"] = hidden, kept
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for index, sample in enumerate(tqdm(samples, total=total, desc=desc)):
            seen.clear()
            try:
                run_embedding_stage(sample)
            except _StopForward:
                pass
            if "hidden" not in seen:
                raise RuntimeError("the model forward never reached decoder block 0")
            hidden = seen["hidden"]
            check_finite(hidden, f"the input of decoder block 0 for calibration sample {index}")
            if modality_ids_of is None:
                modality = torch.zeros(hidden.shape[1], dtype=torch.int8)
            else:
                modality = modality_ids_of(sample).reshape(-1).to(torch.int8).cpu()
            if modality.numel() != hidden.shape[1]:
                raise RuntimeError(
                    f"sample {index}: {modality.numel()} modality ids for {hidden.shape[1]} tokens"
                )
            store.hidden.append(hidden.detach().to(store_device))
            store.kwargs.append(_to(seen["kwargs"], store_device))
            store.modality_ids.append(modality)
            store.labels.append(labels_of(sample) if labels_of else None)
    finally:
        handle.remove()
    return store
