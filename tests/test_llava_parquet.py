"""LLaVA-NeXT-Data as published (parquet shards, llava/parquet_data.py) against its raw-format twin:
the same records, images and calibration tensors; bad shards, globs and sources get one error line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llava import data, parquet_data
from llava.embedded import paths as embedded
from llava.pruners.split_finetune_llava_next import task_ranges
from mmprune.base.entry import run_main
from mmprune.base.errors import UserInputError
from script_runs import load_tensors, run_bash, ROOT

# embedded records of two sources: the raw format's image folders, the shards' data_source
SOURCES = {"sharegpt4v": range(0, 7), "synthvqa_extra": range(256, 260)}


def hub_features():
    """The schema of lmms-lab/LLaVA-NeXT-Data's shards (its dataset card)."""
    from datasets import Features, Image, List, Value

    return Features({"id": Value("string"), "conversations": List({"from": Value("string"), "value": Value("string")}),
                     "data_source": Value("string"), "image": Image()})


def write_shards(folder: Path, rows: list, shards: int, features=None, rows_per_group: int = 2) -> list:
    """`rows` split over `shards` files named as on the hub, a few rows per row group."""
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // shards)
    paths = []
    for i in range(shards):
        part = rows[i * per:(i + 1) * per]
        columns = {key: [row[key] for row in part] for key in (features or hub_features())}
        path = folder / f"train-{i:05d}-of-{shards:05d}.parquet"
        Dataset.from_dict(columns, features=features or hub_features()).to_parquet(str(path), batch_size=rows_per_group)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The same 11 records as a raw-format JSON (images in <source>/ folders, task_split.json) and
    as two parquet shards (image bytes inside, data_source = the folder)."""
    root = tmp_path_factory.mktemp("twins")
    source_records = data.load_records(embedded.DATA_PATH)
    raw, rows = [], []
    for source, indices in SOURCES.items():
        for index in indices:
            record = source_records[index]
            name = Path(record["image"]).name
            target = root / "raw" / source / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(embedded.IMAGE_FOLDER) / record["image"], target)
            raw.append({"id": record["id"], "image": f"{source}/{name}", "conversations": record["conversations"]})
            rows.append({"id": record["id"], "conversations": record["conversations"], "data_source": source,
                         "image": {"bytes": target.read_bytes(), "path": name}})
    (root / "raw" / "data.json").write_text(json.dumps(raw))
    (root / "raw" / "task_split.json").write_text(json.dumps(task_ranges(raw)))
    write_shards(root / "hub" / "data", rows, shards=2)  # the source boundary lies inside the first shard
    return root


def raw_draw(twins, task, nsamples, seed):
    raw = twins / "raw"
    return parquet_data.draw_calibration(raw / "data.json", raw / "task_split.json", task, nsamples, seed)


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(embedded.CHECKPOINT_DIR)


@pytest.mark.parametrize("task,nsamples,seed", [("sharegpt4v", 5, 42), ("sharegpt4v", 7, 3), ("synthvqa_extra", 3, 0),
                                                ("synthvqa_extra", None, 0)])
def test_parquet_draw_is_the_raw_draw_with_the_same_images(twins, processor, task, nsamples, seed):
    raw = raw_draw(twins, task, nsamples, seed)
    for source in (twins / "hub", twins / "hub" / "data" / "*.parquet"):  # a folder (searched below) and a glob
        hub = parquet_data.draw_calibration(str(source), None, task, nsamples, seed)
        assert [r["id"] for r in hub] == [r["id"] for r in raw]
        assert [r["conversations"] for r in hub] == [r["conversations"] for r in raw]
        for h, r in zip(hub, raw):
            assert h["data_source"] == task
            a, b = data.open_record_image(h, None), data.load_image(twins / "raw", r["image"])
            assert a.size == b.size and a.tobytes() == b.tobytes()
    for h, r in zip(hub, raw):  # the calibration inputs: ids, pixels, labels and modality ids
        a = data.encode_record(processor, h, None)
        b = data.encode_record(processor, r, twins / "raw")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_parquet_calibration_captures_the_raw_tensors(twins, embedded_llava):
    from llava.model import capture_decoder_inputs

    model, processor = embedded_llava
    stores = []
    for records, folder in ((raw_draw(twins, "sharegpt4v", 4, 7), twins / "raw"),
                            (parquet_data.draw_calibration(str(twins / "hub"), None, "sharegpt4v", 4, 7), None)):
        samples = (data.encode_record(processor, r, folder) for r in records)
        stores.append(capture_decoder_inputs(model, samples, "cpu", "cpu", len(records)))
    raw, hub = stores
    assert len(raw) == len(hub) == 4
    for a, b in zip(raw.hidden, hub.hidden):
        assert torch.equal(a, b)


def test_only_the_row_groups_holding_drawn_rows_are_read(twins, monkeypatch):
    import datasets

    converted, groups = [], []
    real_record, real_shard = parquet_data.to_record, datasets.IterableDataset.shard
    monkeypatch.setattr(parquet_data, "to_record", lambda row, file: converted.append(row["id"]) or real_record(row, file))
    monkeypatch.setattr(datasets.IterableDataset, "shard",
                        lambda self, num_shards, index, **kw: groups.append(index) or real_shard(self, num_shards, index, **kw))
    drawn = parquet_data.draw_calibration(str(twins / "hub"), None, "sharegpt4v", 3, 42)
    assert sorted(converted) == sorted(r["id"] for r in drawn)  # no other row reaches Python
    # sharegpt4v is rows 0-5 of the first shard and row 0 of the second, in row groups of 2 rows:
    # exactly the groups holding the drawn positions are read, once each, shard after shard
    positions = np.random.default_rng(42).choice(7, size=3, replace=False)
    expected = sorted({(int(p) >= 6, (int(p) % 6) // 2) for p in positions})
    assert groups == [group for _, group in expected]


def test_without_row_group_shards_one_pass_over_the_shard_gives_the_same_draw(twins, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.IterableDataset, "reshard", lambda self: self)  # one stream shard per file
    hub = parquet_data.draw_calibration(str(twins / "hub"), None, "sharegpt4v", 5, 42)
    assert [r["id"] for r in hub] == [r["id"] for r in raw_draw(twins, "sharegpt4v", 5, 42)]


def test_repeated_ids_and_text_only_rows(tmp_path):
    png = (Path(embedded.IMAGE_FOLDER) / "sharegpt4v" / "00000.png").read_bytes()
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    rows = [{"id": "x", "conversations": turns, "data_source": "s", "image": {"bytes": png, "path": "a.png"}},
            {"id": "x", "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "b"}],
             "data_source": "s", "image": None},
            {"id": "x", "conversations": turns, "data_source": "t", "image": {"bytes": png, "path": "a.png"}}]
    write_shards(tmp_path, rows, shards=1, rows_per_group=1)
    whole = parquet_data.draw_calibration(str(tmp_path), None, "s", None, 0)
    assert [r["conversations"][1]["value"] for r in whole] == ["a", "b"]  # the second "x" is the text-only row
    assert data.record_image(whole[1]) is None and data.IMAGE_BYTES not in whole[1]
    assert data.record_image(whole[0]) == "a.png" and whole[0][data.IMAGE_BYTES] == png


# ------------------------------------------------------------------------------------- bad input


def pruners(capsys, *args) -> str:
    from llava.pruners.__main__ import main

    assert run_main(main, ["--no_eval", "--method", "wanda", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def test_bad_parquet_inputs_are_one_line_each(twins, tmp_path, capsys):
    out = tmp_path / "out"
    hub = twins / "hub"
    line = pruners(capsys, "--data_path", hub, "--task_name", "nope", "--save_model", out)
    assert line == (f"error: no record of {hub} has data_source 'nope' (--task_name / TASK_NAME); its sources: "
                    "'sharegpt4v' (7), 'synthvqa_extra' (4)")
    assert "matches no files" in pruners(capsys, "--data_path", tmp_path / "none" / "*.parquet", "--save_model", out)
    (tmp_path / "empty").mkdir()
    assert "holds no .parquet files" in pruners(capsys, "--data_path", tmp_path / "empty", "--save_model", out)
    line = pruners(capsys, "--data_path", hub, "--nsamples", "8", "--save_model", out)
    assert "cannot draw 8 samples from task 'sharegpt4v', which has 7 records" in line
    line = pruners(capsys, "--data_path", hub, "--task_split_path", twins / "raw" / "task_split.json", "--save_model", out)
    assert "whose data_source column is the task; drop --task_split_path (TASK_SPLIT)" in line

    from datasets import Features, Image, Value

    partial = Features({"id": Value("string"), "image": Image()})
    png = (twins / "raw" / "sharegpt4v" / "00000.png").read_bytes()
    write_shards(tmp_path / "partial", [{"id": "a", "image": {"bytes": png, "path": "a.png"}}], 1, features=partial)
    line = pruners(capsys, "--data_path", tmp_path / "partial", "--save_model", out)
    assert "train-00000-of-00001.parquet lacks the column(s) conversations, data_source of LLaVA-NeXT-Data" in line
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.parquet").write_text("not parquet")
    assert "cannot read the parquet shard" in pruners(capsys, "--data_path", tmp_path / "notes", "--save_model", out)
    assert not out.exists()


def test_a_corrupt_image_inside_a_shard_is_named(tmp_path):
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    write_shards(tmp_path, [{"id": "r1", "conversations": turns, "data_source": "s",
                             "image": {"bytes": b"\x89PNG\r\n\x1a\nnot an image", "path": "r1.png"}}], 1)
    record = parquet_data.draw_calibration(str(tmp_path), None, "s", 1, 0)[0]
    with pytest.raises(UserInputError, match=r"image r1.png of record 'r1' cannot be read"):
        data.open_record_image(record, None)


# ------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tamp_script_on_the_shards_equals_the_raw_format_run(twins, tmp_path):
    outputs = {}
    for name, env in (("raw", {"DATA_PATH": str(twins / "raw" / "data.json")}),
                      ("hub", {"DATA_PATH": str(twins / "hub")})):
        outputs[name] = tmp_path / name
        run_bash(ROOT / "scripts/prune/tamp.sh", "0.5", "--no_eval",
                 env={**env, "OUTPUT_DIR": str(outputs[name]), "NSAMPLES": "6"}, timeout=600)
    reports = {k: json.loads((v / "pruning_report.json").read_text()) for k, v in outputs.items()}
    assert reports["hub"]["calibration"]["sample_ids"] == reports["raw"]["calibration"]["sample_ids"]
    assert reports["hub"]["calibration"]["tokens_per_modality"] == reports["raw"]["calibration"]["tokens_per_modality"]
    raw, hub = load_tensors(outputs["raw"]), load_tensors(outputs["hub"])
    assert raw.keys() == hub.keys() and all(torch.equal(raw[k], hub[k]) for k in raw)
    assert reports["hub"]["achieved_sparsity"] == reports["raw"]["achieved_sparsity"]
