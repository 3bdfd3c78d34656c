"""Checks of user input shared by the entry points of both models. Each raises a UserInputError
that names the problem and the fix, and runs before the model is loaded wherever it can; odd but
legitimate input gets one `warning:` line instead."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from mmprune.base.errors import UserInputError

MAX_SEED = 2**32 - 1  # numpy's RandomState takes seeds in [0, 2**32)


def warn(message: str) -> None:
    sys.stderr.write(f"warning: {message}\n")


def check_seed(seed, flag: str = "--seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise UserInputError(f"{flag} must be a whole number in [0, {MAX_SEED}], got {seed!r}")
    return int(seed)


def resolve_device(requested: str | None, flag: str = "--device") -> str:
    """The compute device: `requested` checked against this machine, or cuda when available."""
    if requested is None or requested == "":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise UserInputError(f"{flag} {requested!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return requested
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"{flag} {requested}: no CUDA device is available here; use {flag} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserInputError(f"{flag} {requested}: this machine has {count} CUDA device(s), "
                                 f"cuda:0..cuda:{count - 1}; pick one of them")
        return requested
    backend = getattr(torch, device.type, None) if device.type != "meta" else None
    available = getattr(backend, "is_available", None)
    if device.type == "mps":
        available = torch.backends.mps.is_available
    if available is None or not available():
        raise UserInputError(f"{flag} {requested}: no {device.type} device is available here; use cpu or cuda")
    return requested


def check_draw(nsamples: int, available: int, source: str, flag: str = "--nsamples") -> None:
    """A calibration draw of `nsamples` records from the `available` ones of `source`."""
    if nsamples < 1 or nsamples > available:
        fix = f"{flag} {available} or fewer" if nsamples > available else f"{flag} between 1 and {available}"
        raise UserInputError(f"cannot draw {nsamples} calibration samples from {source}, which has {available} "
                             f"records; use {fix}")


def require_file(path, what: str, hint: str) -> Path:
    """`path` must be a file: a folder or a missing path is named as such."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{what} {path} is a folder, not a file; {hint}")
    if not path.is_file():
        raise UserInputError(f"{what} {path} does not exist; {hint}")
    return path


# PIL modes whose pixel values are not 0..255: Image.convert("RGB") clips them, so a 16-bit
# grayscale PNG would come out almost all white.
_WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def image_to_rgb(image, path) -> "Image.Image":
    """An opened PIL image as 8-bit RGB. 16-bit grayscale is scaled by 255/65535 (0 -> 0,
    65535 -> 255); 32-bit integer and float images have no known range and are refused."""
    from PIL import Image

    if image.mode in _WIDE_INTEGER_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UserInputError(f"image {path} holds {image.mode} values outside 0..65535; save it as an 8-bit "
                                 "or 16-bit PNG")
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":
        raise UserInputError(f"image {path} holds floating-point pixels, whose range is unknown; save it as an "
                             "8-bit or 16-bit image")
    return image.convert("RGB")


# ------------------------------------------------------------------------------ checkpoint files


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read in full, or None. Reads the header only."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"it is {size} bytes long, too short for a safetensors header"
            length = struct.unpack("<Q", head)[0]
            if length > size - 8:
                return f"it is truncated: the header alone needs {length + 8} bytes, the file has {size}"
            header = json.loads(handle.read(length))
    except (OSError, ValueError) as exc:
        return f"its header cannot be read ({exc.__class__.__name__})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2]
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        return f"it is truncated: its header describes {needed} bytes, the file has {size}"
    return None


def weight_files(folder) -> list[Path]:
    """The safetensors files a checkpoint folder's loader will read, each checked to be present
    and complete. An index must name only files that exist. Folders with only .bin weights
    return an empty list (torch.load reports its own errors)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UserInputError(f"the weight index {index} is not valid JSON with a 'weight_map'; restore it "
                                 "from the original checkpoint") from None
        files = [folder / name for name in names]
        for path in files:
            if not path.is_file():
                raise UserInputError(f"weights file {path}, named in {index.name}, does not exist; the download "
                                     "is incomplete: fetch the missing shard")
    else:
        files = sorted(folder.glob("*.safetensors"))
    for path in files:
        problem = _safetensors_problem(path)
        if problem:
            raise UserInputError(f"weights file {path} cannot be loaded: {problem}; re-download or re-save it")
    return files


# a tokenizer's vocabulary comes in one of these forms (transformers converts the last two);
# tokenizer_config.json names its special tokens: without it BOS, EOS and pad silently become None
_VOCABULARY_FORMS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
TOKENIZER_FILES_FIX = "copy the missing files from the checkpoint the model was made from (e.g. its base model)"


def missing_tokenizer_files(folder) -> list[str]:
    """The tokenizer files a checkpoint folder lacks, as names to show (empty when complete)."""
    folder = Path(folder)
    missing = []
    if not any(all((folder / name).is_file() for name in form) for form in _VOCABULARY_FORMS):
        missing.append("tokenizer.json (or tokenizer.model, or vocab.json with merges.txt)")
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    return missing


def check_tokenizer_files(folder, missing: Sequence[str] = ()) -> None:
    """Refuse, in one line, a model folder without its tokenizer files (plus `missing`, other
    files the caller found absent): transformers would fail with a long message, or load a
    tokenizer without its special tokens."""
    missing = [*missing_tokenizer_files(folder), *missing]
    if missing:
        raise UserInputError(f"model folder {folder} lacks {' and '.join(missing)}; {TOKENIZER_FILES_FIX}")


def check_loaded_weights(info: dict, model_path, expected_missing: Sequence[str] = (),
                         expected_unexpected: Sequence[str] = ()) -> None:
    """transformers' loading info: every parameter must come from the checkpoint with its shape
    (it would otherwise start from random values); tensors the model does not use get one warning.
    Names containing one of the `expected_*` fragments (e.g. the EAS adapters) are allowed."""
    def surprising(keys, allowed):
        return sorted(k for k in keys if not any(a in k for a in allowed))

    missing = surprising(info.get("missing_keys", ()), expected_missing)
    if missing:
        raise UserInputError(f"the weights in {model_path} lack {len(missing)} parameters of the model "
                             f"(e.g. {', '.join(missing[:3])}); they belong to another model or are incomplete: "
                             "restore the checkpoint's weight files")
    mismatched = list(info.get("mismatched_keys", ()))
    if mismatched:
        shown = ", ".join(sorted(str(m[0] if isinstance(m, (tuple, list)) else m) for m in mismatched)[:3])
        raise UserInputError(f"the weights in {model_path} have {len(mismatched)} parameters with the wrong shape "
                             f"for its config.json (e.g. {shown}); the weights and config.json belong to different models")
    unexpected = surprising(info.get("unexpected_keys", ()), expected_unexpected)
    if unexpected:  # every parameter is loaded; extra tensors are ignored, as transformers does
        warn(f"the weights in {model_path} hold {len(unexpected)} tensors the model does not use "
             f"(e.g. {', '.join(unexpected[:3])}); they are ignored")


# ------------------------------------------------------------------------------ calibration data


def check_calibration_media(method: str, needs_media: bool, with_media: int, total: int, media: str) -> None:
    """DAS and AMIA compare modalities: a calibration set without any `media` is refused for
    them; other methods get one warning that their statistics come from text alone."""
    if total == 0 or with_media > 0:
        return
    if needs_media:
        raise UserInputError(f"none of the {total} calibration samples has {media}, but {method} scores "
                             f"multimodal tokens (DAS/AMIA); calibrate on records with {media} (check --data_path "
                             "and --task_name) or use a method without DAS/AMIA such as wanda")
    warn(f"none of the {total} calibration samples has {media}; {method} calibrates on text tokens only")


def check_answers(method: str, unanswered: Sequence, total: int) -> None:
    """ECoFLaP's loss is over answer tokens: every sample it uses needs an answer."""
    if unanswered:
        shown = ", ".join(repr(i) for i in list(unanswered)[:3])
        raise UserInputError(f"{method} needs an answer (an assistant turn) in every calibration sample, "
                             f"but {len(unanswered)} of {total} have none (ids {shown}); use records with answers "
                             "or a method without ECoFLaP")


def check_calibration_records(cfg, records: list, has_media, has_answer, media: str) -> None:
    """The calibration checks of a prune run, on the drawn records before the model loads:
    multimodal content for DAS/AMIA (one warning for other methods), answers for ECoFLaP.
    `has_media(record)` and `has_answer(record)` are the model side's readers of a record."""
    if not cfg.needs_calibration:
        return  # magnitude pruning with a uniform or file allocation reads no data
    needs_media = cfg.layerwise == "das" or cfg.uses_amia
    check_calibration_media(cfg.name, needs_media, sum(1 for r in records if has_media(r)), len(records), media)
    if cfg.layerwise == "ecoflap":
        used = records[: cfg.ecoflap.samples or len(records)]
        check_answers(cfg.name, [r.get("id", i) for i, r in enumerate(used) if not has_answer(r)], len(used))
