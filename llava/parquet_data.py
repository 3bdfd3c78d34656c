"""LLaVA-NeXT-Data as published on the hub: parquet shards with the columns `id`, `conversations`,
`data_source` and `image` (the image bytes inside), read with the `datasets` library in streaming mode.

A record's task is its `data_source`, as the raw format's task is the first folder of its image
(llava/pruners/split_finetune_llava_next.py): the records of one source, in shard order, play the
part of the task's range in the raw JSON, and `draw_source` makes select_task's draw over them. So
the parquet form of a raw-format file (each record's source = its image folder, the same bytes)
gives the same records with the same images.

Never the whole set in memory, nor more read than needed: the `data_source` column alone counts
each shard's records of the task; then, in the shards holding drawn records only, it locates them,
and only the parquet row groups that hold them are read with their conversations and image bytes.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections import Counter
from contextlib import contextmanager

import numpy as np

from llava.data import IMAGE_BYTES, _check_record, load_records, select_task
from mmprune.base.errors import UserInputError, one_line

COLUMNS = ("id", "conversations", "data_source", "image")
SHARDS_HINT = ("pass the folder of the LLaVA-NeXT-Data shards (data/train-*.parquet), a glob of them, or a "
               "raw-format JSON")
_WILDCARDS = "*?["


def is_parquet_source(data_path) -> bool:
    """A folder, a glob or a .parquet file: parquet shards; anything else is a raw-format JSON."""
    text = str(data_path)
    return os.path.isdir(text) or any(c in text for c in _WILDCARDS) or text.endswith(".parquet")


def input_root(data_path) -> str:
    """The folder a glob reads from (the path itself otherwise): what outputs must stay out of."""
    text = str(data_path)
    if not any(c in text for c in _WILDCARDS):
        return text
    parts = text.split(os.sep)
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _WILDCARDS))
    return os.sep.join(parts[:fixed]) or os.sep


def shard_files(data_path) -> list[str]:
    """The parquet files of a folder (searched recursively), a glob or a single file, sorted:
    the hub's names (train-00000-of-00250.parquet, ...) sort in the dataset's order."""
    text = str(data_path)
    if os.path.isdir(text):
        files = glob.glob(os.path.join(glob.escape(text), "**", "*.parquet"), recursive=True)
        if not files:
            raise UserInputError(f"--data_path folder {text} holds no .parquet files; {SHARDS_HINT}")
    elif any(c in text for c in _WILDCARDS):
        files = [path for path in glob.glob(text, recursive=True) if os.path.isfile(path)]
        if not files:
            raise UserInputError(f"--data_path {text} matches no files; {SHARDS_HINT}")
    elif os.path.isfile(text):
        files = [text]
    else:
        raise UserInputError(f"--data_path {text} does not exist; {SHARDS_HINT}")
    return sorted(files)


@contextmanager
def _reading():
    """`datasets` quiet (its log would repeat our errors over several lines) and its cache in a
    temporary folder: streaming writes only lock files there, and nothing is left behind."""
    try:
        import datasets
    except ImportError:
        raise UserInputError("reading parquet shards needs the `datasets` library: pip install -e '.[data]' "
                             "(or pass a raw-format JSON)") from None
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="mmprune-datasets-") as cache:
            yield cache
    finally:
        datasets.logging.set_verbosity(verbosity)


def _stream(file: str, cache: str, columns=None, resharded: bool = False):
    """One shard as a streaming IterableDataset (image bytes left undecoded); `resharded`: one
    stream shard per parquet row group, so that `.shard(n, i)` reads row group i alone."""
    from datasets import Image, load_dataset

    stream = load_dataset("parquet", data_files={"train": [file]}, split="train", streaming=True, cache_dir=cache,
                          columns=list(columns) if columns else None)
    if resharded:
        stream = stream.reshard()
    if "image" in (stream.features or {}):
        stream = stream.cast_column("image", Image(decode=False))
    return stream


def _read(file: str, rows):
    """Iterate `rows` (a shard's stream), an unreadable shard named in one line."""
    import pyarrow

    try:
        yield from rows
    except (OSError, ValueError, TypeError, KeyError, pyarrow.ArrowException) as exc:
        raise UserInputError(f"cannot read the parquet shard {file} ({one_line(exc, 200)}); re-download it or "
                             f"{SHARDS_HINT}") from None


def _check_columns(file: str, cache: str) -> None:
    try:
        features = _stream(file, cache).features or {}
    except (OSError, ValueError, TypeError) as exc:
        raise UserInputError(f"cannot read the parquet shard {file} ({one_line(exc, 200)}); re-download it or "
                             f"{SHARDS_HINT}") from None
    missing = [name for name in COLUMNS if name not in features]
    if missing:
        raise UserInputError(f"parquet shard {file} lacks the column(s) {', '.join(missing)} of LLaVA-NeXT-Data "
                             f"({', '.join(COLUMNS)}); {SHARDS_HINT}")


def _turns(conversations):
    """The turns as a list of {"from", "value"} (a `Sequence` feature gives a dict of lists)."""
    if isinstance(conversations, dict) and set(conversations) >= {"from", "value"}:
        return [{"from": f, "value": v} for f, v in zip(conversations["from"], conversations["value"])]
    return conversations


def to_record(row: dict, file: str) -> dict:
    """A shard row as a raw-format record; its image bytes under IMAGE_BYTES, its "image" a name."""
    record = {"id": row["id"], "conversations": _turns(row["conversations"]), "data_source": row["data_source"]}
    _check_record(record, f"{record['id']!r} of {file}")
    image = row.get("image")
    if image is not None and (image.get("bytes") or image.get("path")):
        if not image.get("bytes"):
            raise UserInputError(f"record {row['id']!r} of {file} names the image {image.get('path')!r} without "
                                 f"its bytes; {SHARDS_HINT}")
        record["image"] = image.get("path") or f"{row['data_source']}/{row['id']}"
        record[IMAGE_BYTES] = image["bytes"]
    return record


def draw_source(data_path, task_name: str, nsamples: int | None, seed: int) -> list:
    """nsamples records whose data_source is `task_name`, drawn as select_task draws from a task's
    range (`default_rng(seed).choice(task size, nsamples, replace=False)`), in drawn order;
    nsamples=None returns the whole source in shard order."""
    files = shard_files(data_path)
    with _reading() as cache:
        counts = []  # per shard: records of the task; and every source, for the error below
        sources: Counter = Counter()
        for file in files:
            _check_columns(file, cache)
            shard = Counter(row["data_source"] for row in _read(file, _stream(file, cache, ["data_source"])))
            counts.append(shard[task_name])
            sources.update(shard)
        size = sum(counts)
        if size == 0:
            shown = ", ".join(f"{name!r} ({count})" for name, count in sorted(sources.items(), key=lambda kv: str(kv[0])))
            raise UserInputError(f"no record of {data_path} has data_source {task_name!r} (--task_name / TASK_NAME); "
                                 f"its sources: {shown or 'none (no records)'}")
        if nsamples is None:
            positions = np.arange(size)
        elif nsamples < 1 or nsamples > size:
            raise UserInputError(f"cannot draw {nsamples} samples from task {task_name!r}, which has {size} records; "
                                 f"use --nsamples between 1 and {size}")
        else:
            positions = np.random.default_rng(seed).choice(size, size=nsamples, replace=False)
        starts = np.cumsum([0] + counts)
        found: dict[int, dict] = {}
        for index, file in enumerate(files):
            wanted = sorted(int(p - starts[index]) for p in positions if starts[index] <= p < starts[index + 1])
            if wanted:
                for ordinal, record in zip(wanted, _records_at(file, cache, task_name, wanted)):
                    found[int(starts[index]) + ordinal] = record
    return [found[int(p)] for p in positions]


def _records_at(file: str, cache: str, task_name: str, ordinals: list[int]) -> list[dict]:
    """The records at `ordinals` (sorted) among a shard's records of the task. The data_source
    column gives their row numbers; then only the row groups holding them are read whole (the
    stream resharded per row group), the shard's footer telling where each group starts."""
    import pyarrow.parquet as pq

    rows, wanted = [], iter(ordinals)
    target = next(wanted)
    task_rows = (number for number, row in enumerate(_read(file, _stream(file, cache, ["data_source"])))
                 if row["data_source"] == task_name)
    for ordinal, number in enumerate(task_rows):
        if ordinal == target:
            rows.append(number)
            target = next(wanted, None)
            if target is None:
                break
    with open(file, "rb") as handle:
        meta = pq.ParquetFile(handle).metadata
    starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
    groups = _stream(file, cache, COLUMNS, resharded=True)
    if groups.num_shards != meta.num_row_groups:  # not split per row group: one pass over the shard
        return _pick(file, groups, rows)
    records = []
    for group in sorted({int(np.searchsorted(starts, r, side="right")) - 1 for r in rows}):
        inside = [r - int(starts[group]) for r in rows if starts[group] <= r < starts[group + 1]]
        records += _pick(file, groups.shard(num_shards=groups.num_shards, index=group), inside)
    return records


def _pick(file: str, stream, numbers: list[int]) -> list[dict]:
    """The rows of `stream` at the sorted row `numbers`, as records; reading stops after the last."""
    picked, last = [], numbers[-1]
    chosen = set(numbers)
    for number, row in enumerate(_read(file, stream)):
        if number in chosen:
            picked.append(to_record(row, file))
        if number == last:
            break
    return picked


def draw_calibration(data_path, task_split_path, task_name: str, nsamples: int | None, seed: int) -> list:
    """select_task on a raw-format JSON, or the same draw on LLaVA-NeXT-Data parquet shards (a
    folder, a glob or a .parquet file), whose task is the data_source column (this module)."""
    if is_parquet_source(data_path):
        return draw_source(data_path, task_name, nsamples, seed)
    return select_task(load_records(data_path), task_split_path, task_name, nsamples, seed)
