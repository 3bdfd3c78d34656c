"""Placement options of a pruning run, parsed and checked before any weight is loaded:
`--device_map auto|balanced|sequential|FILE.json`, `--max_memory 0:20GiB,cpu:60GiB` and
`--offload_folder DIR`. accelerate does the placement; this only turns the options into its
arguments and names what is wrong in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmprune.errors import UserInputError

DEVICE_MAP_MODES = ("auto", "balanced", "sequential")
_NAMED_DEVICES = ("cpu", "disk", "mps")


def parse_device_key(text: str, where: str) -> int | str:
    """A max_memory / device_map device: a GPU index (`0`, `cuda:1`), cpu, disk or mps."""
    key = text.strip().lower()
    if key.startswith("cuda:"):
        key = key[len("cuda:"):]
    if key.isdigit():
        return int(key)
    if key in _NAMED_DEVICES:
        return key
    raise UserInputError(f"{where}: unknown device {text.strip()!r}; use a GPU index (0, 1, ... or cuda:N), "
                         "cpu, disk or mps")


def parse_size(text: str, where: str) -> int:
    from accelerate.utils import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text.strip())
    except (ValueError, TypeError):
        size = -1
    if size <= 0:
        raise UserInputError(f"{where}: {text.strip()!r} is not a memory size; write e.g. 20GiB, 500MB or 1000000")
    return size


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """'0:20GiB,cpu:60GiB' -> {0: 21474836480, 'cpu': 64424509440}."""
    if text is None or not text.strip():
        return None
    out: dict[int | str, int] = {}
    for part in text.split(","):
        if ":" not in part:
            raise UserInputError(f"--max_memory: {part.strip()!r} is not DEVICE:SIZE; write e.g. 0:20GiB,cpu:60GiB")
        device, size = part.rsplit(":", 1)
        key = parse_device_key(device, "--max_memory")
        if key in out:
            raise UserInputError(f"--max_memory names {key!r} twice")
        out[key] = parse_size(size, f"--max_memory {part.strip()}")
    return out


def parse_device_map(text: str | None) -> str | dict | None:
    """A mode name, or the module -> device map of a JSON file."""
    if text is None or text in DEVICE_MAP_MODES:
        return text
    path = Path(text)
    if not path.is_file():
        raise UserInputError(f"--device_map {text!r} is neither {', '.join(DEVICE_MAP_MODES)} nor a JSON file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserInputError(f"--device_map {text}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserInputError(f"--device_map {text}: expected a JSON object of module name -> device")
    return {str(name): parse_device_key(str(device), f"--device_map {text} ({name})") for name, device in raw.items()}


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
