"""Loading a checkpoint: the model built on the meta device and its weights assigned (or placed), the tokenizer."""

from __future__ import annotations

import torch

from mmprune.run.checks import check_tokenizer_files
from mmprune.base.errors import UserInputError, one_line
from videollama2.checkpoint.keys import (
    AUDIO_PREFIX,
    REL_BIAS_TABLE,
    VISION_CHECKPOINT,
    _REL_BIAS,
    _vision_level,
    to_checkpoint_key,
    to_runtime_key,
)
from videollama2.checkpoint.reading import open_weights
from videollama2.config import VideoLLaMA2Config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, config: VideoLLaMA2Config, stored) -> torch.dtype:
    """The dtype to load in: `dtype` itself, config.json's, or the one most stored tensors have
    (`stored`: the tensors, or their dtypes)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in _DTYPES:
            raise UserInputError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        return _DTYPES[dtype]
    named = config.raw.get("torch_dtype") or config.raw.get("dtype")
    if isinstance(named, str) and named in _DTYPES:
        return _DTYPES[named]
    values = stored.values() if isinstance(stored, dict) else stored
    floating = [d for d in (v.dtype if torch.is_tensor(v) else v for v in values) if d.is_floating_point]
    return max(set(floating), key=floating.count) if floating else torch.float32


def _torch_device(device) -> torch.device:
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def load_model(cls, model_dir, dtype="auto", device="cpu", device_map=None, offload_dir=None, main_device=None):
    """Model from a checkpoint folder, with `checkpoint_layout` recorded for saving.

    With `device_map` (module -> GPU index, "cpu" or "disk", e.g. from mmprune.place.plan.make_plan)
    each weight is read straight onto its device and accelerate's hooks are attached
    (`dispatch_model`); weights placed on disk are not read at all: the hooks read them from the
    checkpoint's safetensors file (a .bin checkpoint's are first copied into `offload_dir`)."""
    from accelerate import init_empty_weights

    from mmprune.place.plan import device_of

    config = VideoLLaMA2Config.from_dir(model_dir)
    weights, layout = open_weights(model_dir)
    keys = weights.keys()
    vision_head = any(k.startswith(VISION_CHECKPOINT + "head.") for k in keys)
    audio_predictor = any(k.startswith(AUDIO_PREFIX + "predictor.") for k in keys)
    with init_empty_weights(include_buffers=False):
        model = cls(config, vision_head=vision_head, audio_predictor=audio_predictor)
    keeps_level = _vision_level(model)
    expected = dict(model.state_dict(keep_vars=True))
    sources: dict[str, str] = {}  # runtime name -> checkpoint key
    rel_bias_copies: list[tuple[int, str]] = []
    for key in keys:
        runtime = to_runtime_key(key, keeps_level)
        match = _REL_BIAS.match(key)
        if match and int(match.group(1)) > 0:
            rel_bias_copies.append((int(match.group(1)), key))
            layout.passthrough[key] = weights.get(key)
        elif runtime in expected:
            sources[runtime] = key
        else:
            layout.passthrough[key] = weights.get(key)
    if rel_bias_copies:  # the reference shares layer 0's table: loading each copy in turn, the last wins
        sources[REL_BIAS_TABLE] = max(rel_bias_copies)[1]
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        layout.passthrough.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sources))
    if missing:
        shown = ", ".join(to_checkpoint_key(k, keeps_level) for k in missing[:5])
        raise UserInputError(f"checkpoint {model_dir} lacks {len(missing)} weights of the model (e.g. {shown}); "
                             "the folder is incomplete or not a VideoLLaMA2.1-AV checkpoint")
    for runtime, key in sources.items():
        if weights.shape(key) != tuple(expected[runtime].shape):
            raise UserInputError(f"checkpoint {model_dir}: {to_checkpoint_key(runtime, keeps_level)} has shape "
                                 f"{weights.shape(key)}, config.json implies {tuple(expected[runtime].shape)}")
    target = resolve_dtype(dtype, config, [weights.dtype(k) for k in keys])
    state: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}  # disk-placed weights: where accelerate's hooks read them
    on_disk: list[str] = []
    for runtime, key in sources.items():
        where = device_of(runtime, device_map) if device_map else "cpu"
        floating = weights.dtype(key).is_floating_point
        if where == "disk":
            on_disk.append(runtime)
            direct = weights.safetensors_file(key)
            if direct is not None:
                index[runtime] = {"safetensors_file": direct[0], "weight_name": direct[1],
                                  "dtype": str(target if floating else weights.dtype(key)).removeprefix("torch.")}
            else:
                if offload_dir is None:
                    raise UserInputError("the placement sends weights to disk; an offload folder is needed")
                from accelerate.utils import offload_weight

                value = weights.get(key)
                offload_weight(value.to(target) if floating else value, runtime, offload_dir, index=index)
            continue
        value = weights.get(key)
        value = value.to(target) if floating else value
        state[runtime] = value.to(_torch_device(where))
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for module in model.modules():  # buffers built on the CPU keep their dtype; match the weights
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and name != "inv_freq":
                module._buffers[name] = buf.to(target)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta and n not in on_disk]
    if still_meta:
        raise RuntimeError(f"parameters left uninitialised after loading: {still_meta[:5]}")
    model.checkpoint_layout = layout
    model.eval()
    if not device_map:
        return model.to(device)
    return _dispatch(model, device_map, offload_dir, index, main_device)


def _dispatch(model, device_map: dict, offload_dir, index: dict, main_device):
    """accelerate's hooks for `device_map`: each module runs on its device, modules on "cpu" (with a
    GPU as main device) or "disk" are offloaded and read from their store for each forward."""
    from accelerate import dispatch_model

    from mmprune.place.offload import bind_tied_weights, tied_weights
    from mmprune.place.plan import disjoint_map

    device_map = disjoint_map(model, device_map)
    devices = set(device_map.values())
    if len(devices) == 1 and "disk" not in devices:
        return model.to(_torch_device(devices.pop()))
    kwargs = {"main_device": main_device} if main_device is not None else {}  # an index or "cpu", as in the map
    ties = tied_weights(model)  # read before the hooks give each module its own meta tensor
    # an index (possibly empty) keeps accelerate from offloading the meta weights a second time
    model = dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir) if offload_dir else None,
                           offload_index=index if "disk" in devices else None, **kwargs)
    bind_tied_weights(model, ties)
    return model


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    check_tokenizer_files(model_dir)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # some versions warn that config.json's model_type is not a tokenizer's
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as exc:
        raise UserInputError(f"cannot load the tokenizer of {model_dir}: {one_line(exc, 200)}") from None
    finally:
        logging.set_verbosity(verbosity)
