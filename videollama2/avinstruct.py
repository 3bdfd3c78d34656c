"""AVInstruct annotations -> the JSON the VideoLLaMA2-AV loader reads.

AVInstruct (Bay-CAT) annotations are JSON lists of {"video_id": ..., "conversations": [...]},
the human turns marking the question with "<Q>" and the media with "<video>". The transformed
records are

    {"id": n, "audio": "<video_id>.mp4", "video": "<video_id>.mp4", "conversations": [...]}

with "<video>\\n" at the front of the first human turn and "<Q>" removed; the audio is the
video's own track. Annotations whose video file is missing from the video folder are dropped
and counted. Other fields of an annotation (e.g. a question "kind") are kept.

    python datasets/transform_to_avinstruct.py --video_dir DIR --dataset_path1 A.json \\
        --dataset_path2 B.json --save_path OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmprune.base.errors import UserInputError
from mmprune.base.output import check_output_file, write_json_file


def read_annotations(path) -> list:
    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise UserInputError(f"annotation file {path} {state}; pass an AVInstruct JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserInputError(f"annotation file {path} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                             f"{exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise UserInputError(f"annotation file {path} is not UTF-8 text ({exc.reason})") from None
    if not isinstance(data, list):
        raise UserInputError(f"annotation file {path} holds a JSON {type(data).__name__}, expected a list")
    return data


def video_file_name(video_id: str) -> str:
    return video_id if video_id.lower().endswith(".mp4") else f"{video_id}.mp4"


def transform_conversations(turns: list, where: str) -> list:
    if not isinstance(turns, list) or not turns:
        raise UserInputError(f"{where} has no 'conversations' list")
    out = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise UserInputError(f"{where} has a malformed turn {turn!r}; each needs 'from' and a string 'value'")
        value = turn["value"]
        if turn["from"] == "human":
            value = value.replace("<Q>", "")
            if index == 0:
                value = "<video>\n" + value.replace("<video>", "").strip()
            value = value.strip()
        out.append({**turn, "value": value})
    return out


def transform(annotations: list, video_dir) -> tuple[list, list]:
    """(records, dropped video ids) for annotations in order."""
    video_dir = Path(video_dir)
    records, dropped = [], []
    for index, sample in enumerate(annotations):
        where = f"annotation {index}"
        if not isinstance(sample, dict) or not isinstance(sample.get("video_id"), str) or not sample["video_id"]:
            raise UserInputError(f"{where} has no 'video_id' string: {str(sample)[:120]}")
        name = video_file_name(sample["video_id"])
        if not (video_dir / name).is_file():
            dropped.append(sample["video_id"])
            continue
        extra = {k: v for k, v in sample.items() if k not in ("video_id", "conversations", "id", "video", "audio")}
        records.append({"id": len(records), "audio": name, "video": name,
                        "conversations": transform_conversations(sample.get("conversations"), where), **extra})
    return records, dropped


def write_json_atomic(path, data) -> None:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserInputError(f"the folder of --save_path {path} does not exist; create it first")
    write_json_file(str(path), data)


def is_transformed(path) -> bool:
    """Whether `path` holds records this transform wrote: the only file --save_path replaces."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, list) and all(
        isinstance(r, dict) and "conversations" in r and ("video" in r or "audio" in r) for r in data)


def parse_args(argv=None) -> argparse.Namespace:
    from mmprune.base.entry import OneLineErrorParser

    parser = OneLineErrorParser(prog="python datasets/transform_to_avinstruct.py",
                                description="Turn AVInstruct annotations into the VideoLLaMA2-AV loader's JSON.")
    parser.add_argument("--video_dir", required=True, help="folder of the <video_id>.mp4 files (e.g. AVQA-Music)")
    parser.add_argument("--dataset_path1", required=True, help="first AVInstruct annotation JSON")
    parser.add_argument("--dataset_path2", required=True, help="second AVInstruct annotation JSON (appended)")
    parser.add_argument("--save_path", required=True, help="output JSON")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_output_file(args.save_path, True, [args.dataset_path1, args.dataset_path2, args.video_dir], "--save_path",
                      is_transformed, "transformed AVInstruct JSON")
    if not Path(args.video_dir).is_dir():
        raise UserInputError(f"--video_dir {args.video_dir} is not a folder; pass the folder of the .mp4 files")
    annotations = read_annotations(args.dataset_path1) + read_annotations(args.dataset_path2)
    records, dropped = transform(annotations, args.video_dir)
    if not records:
        raise UserInputError(f"none of the {len(annotations)} annotations has its video in {args.video_dir}; "
                             "check --video_dir (videos are looked up as <video_id>.mp4)")
    write_json_atomic(args.save_path, records)
    message = f"wrote {len(records)} records to {args.save_path}"
    if dropped:
        shown = ", ".join(dropped[:3]) + (", ..." if len(dropped) > 3 else "")
        message += f"; dropped {len(dropped)} of {len(annotations)} annotations whose video is missing ({shown})"
    print(message)
    return 0


if __name__ == "__main__":
    from mmprune.base.entry import run_main

    sys.exit(run_main(main))
