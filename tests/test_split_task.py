"""llava/pruners/split_finetune_llava_next.py: {task: [start, end)} from image paths."""

import json

import pytest

from llava.pruners import split_finetune_llava_next as split
from mmprune.base.errors import UserInputError


def _record(image):
    record = {"id": image, "conversations": [{"from": "human", "value": "<image>\nq"},
                                            {"from": "gpt", "value": "a"}]}
    if image is not None:
        record["image"] = image
    return record


def _write(path, images):
    path.write_text(json.dumps([_record(i) for i in images]))
    return path


def test_contiguous_tasks_give_half_open_ranges():
    records = [_record(p) for p in ("a/1.png", "a/2.png", "b/x/3.png", "c/4.png", "c/5.png")]
    assert split.task_ranges(records) == {"a": [0, 2], "b": [2, 3], "c": [3, 5]}


def test_task_in_two_runs_is_an_error():
    records = [_record(p) for p in ("a/1.png", "b/2.png", "a/3.png")]
    with pytest.raises(UserInputError, match="'a' appears in two separate runs"):
        split.task_ranges(records)


@pytest.mark.parametrize("image", [None, "", "noslash.png", "/abs.png"])
def test_record_without_task_is_an_error(image):
    with pytest.raises(UserInputError, match="record 1"):
        split.task_ranges([_record("a/1.png"), _record(image)])


def test_cli_writes_beside_data_by_default(tmp_path, capsys):
    data = _write(tmp_path / "data.json", ["t1/a.png", "t1/b.png", "t2/c.png"])
    assert split.main(["--data_path", str(data)]) == 0
    assert json.loads((tmp_path / "task_split.json").read_text()) == {"t1": [0, 2], "t2": [2, 3]}
    assert "t1: [0, 2) 2 records" in capsys.readouterr().out


def test_cli_save_path(tmp_path):
    data = _write(tmp_path / "data.json", ["t1/a.png"])
    out = tmp_path / "sub" / "split.json"
    assert split.main(["--data_path", str(data), "--save_path", str(out)]) == 0
    assert json.loads(out.read_text()) == {"t1": [0, 1]}


def test_cli_errors_exit_2(tmp_path, capsys):
    assert split.main(["--data_path", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.json" in err and err.count("\n") == 1
    data = _write(tmp_path / "data.json", ["a/1.png", "b/1.png", "a/2.png"])
    assert split.main(["--data_path", str(data)]) == 2
    assert "contiguous" in capsys.readouterr().err


def test_default_data_path_is_the_real_one():
    args = split.parse_args([])
    assert str(args.data_path) == (
        "playground/LLaVA-NeXT-Data/llava_next_raw_format/llava_next_raw_format_processed.json")
