"""Syntax of the placement flags (`--device_map auto|balanced|sequential|FILE.json`, `--max_memory
0:20GiB,cpu:60GiB`, sizes such as `--max_shard_size 2GB`), parsed before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

from mmprune.base.errors import UserInputError

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
