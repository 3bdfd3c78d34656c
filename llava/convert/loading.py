"""Loaders of a llava-hf LLaVA-NeXT folder (an lmms-lab one converted first): model and processor, checked."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from llava.convert.configs import _read_config, is_llava_hf_checkpoint, is_lmms_lab_checkpoint
from llava.convert.conversion import CONVERTER_COMMAND, _convert_on_load
from llava.convert.weights import parse_dtype
from mmprune.run.checks import check_tokenizer_files
from mmprune.base.errors import UserInputError, one_line


def load_pretrained_checked(model_class, hf_dir, **kwargs):
    """from_pretrained with the weight files checked first (an index naming a missing shard, a
    truncated file) and every parameter required to come from them: transformers would otherwise
    start missing ones from random values and go on with a long load report. The report is
    muted: check_loaded_weights says what matters in one line. A checkpoint saved with
    --save_format compressed is read through its dense copy (mmprune.base.sparse_format), since
    transformers 5.x cannot load compressed-tensors' sparse formats."""
    from transformers.utils import logging as hf_logging

    from llava import eas
    from mmprune.base.sparse_format import dense_checkpoint
    from mmprune.run.checks import check_loaded_weights, weight_files

    weight_files(hf_dir)
    hf_dir = dense_checkpoint(hf_dir)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        # mismatched shapes come back in `info` (named below) rather than as an error pointing to the muted report
        model, info = model_class.from_pretrained(str(hf_dir), output_loading_info=True, ignore_mismatched_sizes=True,
                                                  **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else exc.__class__.__name__
        raise UserInputError(f"cannot load the model weights from {hf_dir} ({first}); restore the checkpoint") from None
    finally:
        hf_logging.set_verbosity(previous)
    check_loaded_weights(info, hf_dir, *eas.expected_load_gaps(hf_dir))
    return model


def check_processor_files(hf_dir) -> None:
    """A llava-hf folder's processor files, named in one line when missing: the tokenizer's and
    the image processor's (preprocessor_config.json, or processor_config.json holding it)."""
    hf_dir = Path(hf_dir)
    image_processor = (hf_dir / "preprocessor_config.json").is_file()
    if not image_processor and (hf_dir / "processor_config.json").is_file():
        try:
            image_processor = "image_processor" in json.loads((hf_dir / "processor_config.json").read_text("utf-8"))
        except (OSError, ValueError, TypeError):
            raise UserInputError(f"{hf_dir / 'processor_config.json'} is not valid JSON; restore it from the "
                                 "checkpoint") from None
    check_tokenizer_files(hf_dir, () if image_processor else
                          ["preprocessor_config.json (or a processor_config.json holding the image processor)"])


def load_processor(hf_dir):
    """The LlavaNextProcessor of a llava-hf folder, its files checked first."""
    from transformers import AutoProcessor

    check_processor_files(hf_dir)
    try:
        return AutoProcessor.from_pretrained(str(hf_dir))
    except (OSError, ValueError, TypeError) as exc:
        raise UserInputError(f"cannot load the processor of {hf_dir} ({one_line(exc)}); restore the checkpoint's "
                             "tokenizer and processor files") from None


def load_llava_next(model_path, dtype="auto", device_map=None, attn_implementation="sdpa", convert_cache_dir=None,
                    offload_folder=None):
    """Load a LLaVA-NeXT model and its processor: returns (model, processor), model in eval mode.
    With `device_map` accelerate places it (modules on "disk" are read from `offload_folder`).

    model_path: a llava-hf directory (loaded as is) or an lmms-lab checkpoint (converted first,
    into convert_cache_dir when given -- reused on later calls -- else into a temporary directory).
    dtype: "auto" (the stored dtype), a torch dtype or its name.
    """
    from transformers import LlavaNextForConditionalGeneration

    path = Path(model_path).expanduser()
    expected = (
        "expected a llava-hf LLaVA-NeXT directory (config.json with model_type 'llava_next') or an "
        f"lmms-lab LLaVA-NeXT checkpoint (config.json with mm_* fields; convert it with `{CONVERTER_COMMAND}`)"
    )
    if not path.exists():
        raise UserInputError(f"model path {path} does not exist; {expected}")
    if not path.is_dir():
        raise UserInputError(f"model path {path} is not a directory; {expected}")
    load_dtype = dtype if (isinstance(dtype, str) and dtype == "auto") else parse_dtype(dtype)

    if is_llava_hf_checkpoint(path):
        hf_dir = path
    elif is_lmms_lab_checkpoint(path):
        hf_dir = _convert_on_load(path, convert_cache_dir)
    else:
        cfg = _read_config(path)
        what = "has no readable config.json" if cfg is None else f"has model_type {cfg.get('model_type')!r}"
        raise UserInputError(f"model path {path} {what}; {expected}")

    processor = load_processor(hf_dir)  # a missing processor file stops the run before the weights load
    kwargs = {"dtype": load_dtype, "attn_implementation": attn_implementation}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    from llava import eas

    with warnings.catch_warnings():
        # a placement names parameters such as model.image_newline; accelerate says they are not modules
        warnings.filterwarnings("ignore", message="The following device_map keys do not match any submodules")
        model = load_pretrained_checked(LlavaNextForConditionalGeneration, hf_dir, **kwargs)
    if device_map is not None:
        from mmprune.place.offload import bind_tied_weights

        bind_tied_weights(model)  # an offloaded tied head reads the embedding's entry
    eas.install_from_config(model, hf_dir)  # skipped attention + adapters of an EAS model
    model.eval()
    return model, processor


def load_model(model_path, device: str | None = None):
    """(model, processor) from a llava-hf style directory; float32 on CPU, bfloat16 on GPU."""
    from transformers import LlavaNextForConditionalGeneration

    from llava import eas
    from mmprune.run.checks import resolve_device

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise UserInputError(f"model directory {model_path} has no config.json; pass a llava-hf "
                             "LLaVA-NeXT checkpoint directory to --model_path")
    device = resolve_device(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    processor = load_processor(model_path)
    model = load_pretrained_checked(LlavaNextForConditionalGeneration, model_path, dtype=dtype)
    eas.install_from_config(model, model_path)  # skipped attention + adapters of an EAS model
    return model.to(device), processor
