"""Split the LLaVA-NeXT fine-tuning data into tasks: writes task_split.json.

A record's task is the first path component of its `image` field (as in the public TAMP code),
e.g. "sharegpt4v/abc.png" -> "sharegpt4v". The output maps each task to the half-open index
range [start, end) of its records in the data file, so calibration can draw from one task:

    {"sharegpt4v": [0, 256], "synthvqa_extra": [256, 320]}

Every task must be one contiguous run of records; a task that appears in two separate runs (or a
record without `image`) is an error rather than being silently merged.

    python -m llava.pruners.split_finetune_llava_next [--data_path JSON] [--save_path JSON]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llava.data import load_records
from llava.embedded.paths import REAL_DATA_PATH
from mmprune.base.entry import run_main
from mmprune.base.errors import UserInputError
from mmprune.base.output import check_output_file, write_json_file


def record_task(record: dict, index: int) -> str:
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise UserInputError(
            f"record {index} (id {record.get('id')!r}) has no 'image' path, so its task cannot be "
            "told; every record of the fine-tuning data must name an image '<task>/<file>'")
    parts = image.split("/")
    if len(parts) < 2 or not parts[0]:
        raise UserInputError(
            f"record {index} (id {record.get('id')!r}) has image {image!r} without a task folder; "
            "expected '<task>/<file>'")
    return parts[0]


def task_ranges(records: list) -> dict:
    """{task: [start, end)} for contiguous runs of records sharing a task, in file order."""
    ranges: dict = {}
    previous = None
    for index, record in enumerate(records):
        task = record_task(record, index)
        if task == previous:
            ranges[task][1] = index + 1
            continue
        if task in ranges:
            start, end = ranges[task]
            raise UserInputError(
                f"task {task!r} appears in two separate runs (records {start}..{end - 1} and again "
                f"at record {index}); sort the data file so each task's records are contiguous")
        ranges[task] = [index, index + 1]
        previous = task
    return ranges


def is_task_split(path) -> bool:
    """Whether `path` holds a task split ({task: [start, end)}): the only file --save_path replaces."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) for i in v) for v in data.values())


def write_task_split(data_path, save_path) -> dict:
    check_output_file(str(save_path), True, [str(data_path)], "--save_path", is_task_split, "task split")
    ranges = task_ranges(load_records(data_path))
    write_json_file(str(save_path), ranges)
    return ranges


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llava.pruners.split_finetune_llava_next",
        description="Group LLaVA-NeXT raw-format records by task and write {task: [start, end)}.")
    parser.add_argument("--data_path", type=Path, default=REAL_DATA_PATH,
                        help="LLaVA-NeXT raw-format JSON (default: %(default)s)")
    parser.add_argument("--save_path", type=Path, default=None,
                        help="output JSON (default: task_split.json beside --data_path)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Errors end as one `error:` line, exit 2 (also when called from Python, as the tests do)."""
    return run_main(_main, argv)


def _main(argv) -> int:
    args = parse_args(argv)
    save_path = args.save_path or args.data_path.parent / "task_split.json"
    ranges = write_task_split(args.data_path, save_path)
    for task, (start, end) in ranges.items():
        print(f"{task}: [{start}, {end}) {end - start} records")
    print(f"wrote {save_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
