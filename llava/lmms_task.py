"""Evaluate a LLaVA-NeXT checkpoint with lmms-eval's `llava_hf` model (scripts/eval/lmms_eval.sh).

    python -m llava.lmms_task --model_path DIR                      # local task on the embedded eval split
    python -m llava.lmms_task --model_path DIR --data_path JSON [--image_folder DIR]   # any raw-format data
    python -m llava.lmms_task --model_path DIR --tasks mme,gqa      # lmms-eval's own tasks (real checkpoints)

Without --tasks, and always for the embedded tiny model and checkpoints pruned or trained from it
(their word-level tokenizer only knows the synthetic task), it runs a local lmms-eval task,
`mmprune_vqa`, built at run time from a LLaVA-NeXT raw-format JSON (default: the embedded held-out
split) into a temporary directory: a `datasets` dataset saved to disk plus a task yaml pointing at
it, so nothing comes from a hub.
Its answers are scored as `python -m llava.eval` scores them (mmprune.evaluate.scoring.normalize_answer,
exact match against the record's final gpt turn, at most 8 new tokens, greedy), so the accuracy
means the same. Prints one JSON line: n, accuracy, per_kind, lmms-eval's version and where its
logs went. --predictions FILE also writes one JSON line per record.

The functions doc_to_visual, doc_to_text and process_results are what the task yaml names; they
need neither lmms-eval nor torch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mmprune.evaluate.scoring import normalize_answer

TASK_NAME = "mmprune_vqa"
MAX_NEW_TOKENS = 8  # llava.eval's DEFAULT_MAX_NEW_TOKENS
MODEL = "llava_hf"


# --------------------------------------------------------------------------------------------
# What the task yaml calls (module-level: lmms-eval imports them by dotted name)


def doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    # llava_hf puts "<image>\n" in front, as encode_record does for "<image>\n<question>" records
    return doc["question"]


def process_results(doc: dict, results: list) -> dict:
    return {"accuracy": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}


# --------------------------------------------------------------------------------------------
# Building the local task


def task_record(record: dict) -> dict:
    """(question, answer) of a single-turn image record, as llava_hf will prompt it."""
    from llava.data import IMAGE_PLACEHOLDER, ROLES, record_image, reference_answer
    from mmprune.base.errors import UserInputError

    turns = record["conversations"]
    if len(turns) != 2 or ROLES.get(turns[0]["from"]) != "user" or reference_answer(record) is None:
        raise UserInputError(f"record {record.get('id')!r}: the lmms-eval task takes one question and its gpt "
                             "answer per record (llava_hf sends one user message)")
    if record_image(record) is None:
        raise UserInputError(f"record {record.get('id')!r} has no image; the lmms-eval task is visual QA")
    value = turns[0]["value"]
    if IMAGE_PLACEHOLDER in value and not value.lstrip().startswith(IMAGE_PLACEHOLDER):
        # llava_hf always puts the image first; llava.eval would put it where the placeholder is
        raise UserInputError(f"record {record.get('id')!r}: '<image>' is not at the start of the question, "
                             "so lmms-eval's llava_hf and llava.eval would build different prompts")
    return {"question": value.replace(IMAGE_PLACEHOLDER, "").strip(), "answer": reference_answer(record)}


def build_task(data_path, image_folder, task_dir, limit: int | None = None) -> list:
    """Write the dataset (task_dir/data) and the task yaml into task_dir; returns its rows without
    the images, in dataset order (lmms-eval's logged samples name them by position only)."""
    import datasets

    from llava.data import load_image, load_records

    records = load_records(data_path)[:limit]
    rows = []
    for record in records:
        row = task_record(record)
        image = load_image(image_folder, record["image"])
        rows.append({"id": str(record.get("id", len(rows))), "kind": record.get("kind") or "",
                     "image": image, **row})
    features = datasets.Features({"id": datasets.Value("string"), "kind": datasets.Value("string"),
                                  "image": datasets.Image(), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string")})
    # PNG inside the dataset: lossless, so llava_hf sees the pixels llava.eval loads
    dataset = datasets.Dataset.from_list(rows, features=features)
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(Path(task_dir) / "data"))
    yaml_text = f"""\
# Written by llava/lmms_task.py for {json.dumps(str(data_path))}
task: {TASK_NAME}
dataset_path: {json.dumps(str(Path(task_dir).resolve() / "data"))}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function llava.lmms_task.doc_to_visual
doc_to_text: !function llava.lmms_task.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
  temperature: 0
  num_beams: 1
  do_sample: false
process_results: !function llava.lmms_task.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
    (Path(task_dir) / f"{TASK_NAME}.yaml").write_text(yaml_text)
    return [{k: v for k, v in row.items() if k != "image"} for row in rows]


# --------------------------------------------------------------------------------------------
# Running lmms-eval


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_args(model_path, device: str, local: bool) -> str:
    """llava_hf's --model_args. The local task loads the model as llava.eval does (float32 on the
    CPU, bfloat16 on a GPU, one device); real tasks keep lmms-eval's dtype and device_map=auto."""
    args = [f"pretrained={Path(model_path).resolve()}"]
    if device == "cpu":
        args += ["device=cpu", "device_map=cpu"]
    elif local:
        args += [f"device={device}", f"device_map={device}"]
    else:
        args += ["device_map=auto"]
    if local:
        args.append("dtype=" + ("float32" if device == "cpu" else "bfloat16"))
    return ",".join(args)


def lmms_eval_command(model_path, tasks: str, output_path, device: str, local: bool, include_path=None,
                      extra=()) -> list:
    command = [sys.executable, "-m", "lmms_eval", "--model", MODEL,
               "--model_args", model_args(model_path, device, local),
               "--tasks", tasks, "--batch_size", "1", "--log_samples", "--output_path", str(output_path)]
    if include_path is not None:
        command += ["--include_path", str(include_path)]
    return command + list(extra)


def results_files(output_path) -> set:
    """lmms-eval's results files under output_path (earlier runs' stay there too)."""
    return set(Path(output_path).rglob("*_results.json"))


def read_outputs(output_path, before: set) -> tuple:
    """(lmms-eval's results dict, its logged samples) of the local task run that found `before`."""
    from mmprune.base.errors import UserInputError

    found = sorted(results_files(output_path) - before)
    if len(found) != 1:
        raise UserInputError(f"expected one new lmms-eval results file under {output_path}, found {len(found)}; "
                             "its log above says what went wrong")
    # <time>_results.json and <time>_samples_<task>.jsonl, side by side
    samples_file = found[0].with_name(found[0].name.replace("_results.json", f"_samples_{TASK_NAME}.jsonl"))
    if not samples_file.is_file():
        raise UserInputError(f"lmms-eval wrote {found[0]} but no {samples_file.name} beside it")
    with open(samples_file, encoding="utf-8") as f:
        samples = [json.loads(line) for line in f if line.strip()]
    return json.loads(found[0].read_text()), samples


def _response(sample: dict) -> str:
    """The model's text in a logged sample (lists nest one level per repeat)."""
    resp = sample.get("filtered_resps", sample.get("resps"))
    while isinstance(resp, list):
        resp = resp[0] if resp else ""
    return resp or ""


def summarize(results: dict, samples: list, docs: list) -> dict:
    """Accuracy overall (lmms-eval's aggregate, checked against the samples) and per kind."""
    from mmprune.base.errors import UserInputError

    if sorted(s["doc_id"] for s in samples) != list(range(len(docs))):
        raise UserInputError(f"lmms-eval logged {len(samples)} samples for {len(docs)} records")
    predictions = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        doc = docs[sample["doc_id"]]
        predictions.append({"id": doc["id"], "kind": doc["kind"] or None, "prediction": _response(sample),
                            "answer": doc["answer"], "correct": bool(sample["accuracy"])})
    per_kind: dict = {}
    for p in predictions:
        if p["kind"] is not None:
            per_kind.setdefault(p["kind"], []).append(p["correct"])
    accuracy = results["results"][TASK_NAME]["accuracy,none"]
    recount = sum(p["correct"] for p in predictions) / len(predictions)
    if abs(accuracy - recount) > 1e-9:
        raise UserInputError(f"lmms-eval reports accuracy {accuracy} but its samples give {recount}")
    return {"n": len(predictions), "accuracy": accuracy,
            "per_kind": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(per_kind.items())},
            "predictions": predictions}


def lmms_eval_version() -> str:
    from importlib.metadata import version

    return version("lmms-eval")


def run_local(model_path, data_path, image_folder, output_path, device: str, limit: int | None = None,
              extra=()) -> dict:
    """The local task through lmms-eval's CLI (a subprocess, its own logs on stderr); the summary."""
    from mmprune.base.errors import UserInputError

    with tempfile.TemporaryDirectory(prefix="mmprune-lmms-task-") as task_dir:
        docs = build_task(data_path, image_folder, task_dir, limit)
        print(f"lmms-eval task {TASK_NAME}: {len(docs)} records of {data_path} -> {task_dir}", file=sys.stderr)
        command = lmms_eval_command(model_path, TASK_NAME, output_path, device, True, task_dir, extra)
        print("+ " + " ".join(command), file=sys.stderr)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        before = results_files(output_path)
        done = subprocess.run(command, stdout=sys.stderr, env=env)
        if done.returncode != 0:
            raise UserInputError(f"lmms-eval exited with status {done.returncode}")
    results, samples = read_outputs(output_path, before)
    return {"model_path": str(model_path), "evaluator": f"lmms-eval {lmms_eval_version()} {MODEL}",
            "task": TASK_NAME, "data_path": str(data_path), **summarize(results, samples, docs),
            "output_path": str(output_path)}


def is_embedded_derived(model_path) -> bool:
    """Whether the checkpoint carries the embedded tiny LLaVA-NeXT's tokenizer (the embedded model
    itself and everything pruned or trained from it)."""
    from llava.embedded import paths

    mine, theirs = Path(model_path) / "tokenizer.json", paths.CHECKPOINT_DIR / "tokenizer.json"
    return mine.is_file() and mine.read_bytes() == theirs.read_bytes()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m llava.lmms_task", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", type=Path, required=True, help="llava-hf LLaVA-NeXT checkpoint directory")
    parser.add_argument("--tasks", default=None,
                        help="lmms-eval tasks (comma separated) to run as they are; default: the local task "
                             f"{TASK_NAME} on --data_path")
    parser.add_argument("--data_path", type=Path, default=None,
                        help="raw-format JSON for the local task (default: the embedded eval split)")
    parser.add_argument("--image_folder", type=Path, default=None,
                        help="images of --data_path (default: its folder, or the embedded eval images)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--limit", type=int, default=None, help="first N records (local) / lmms-eval --limit")
    parser.add_argument("--output_path", type=Path, default=None,
                        help="lmms-eval's --output_path (default: logs/lmms_eval/<model>)")
    parser.add_argument("--predictions", type=Path, default=None,
                        help="local task: write one JSON line per record (id, kind, prediction, answer, correct)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from llava.embedded import paths
    from mmprune.base.errors import UserInputError

    args = parse_args(argv)
    try:
        if not (args.model_path / "config.json").is_file():
            raise UserInputError(f"model directory {args.model_path} has no config.json; pass a llava-hf "
                                 "LLaVA-NeXT checkpoint directory")
        if args.limit is not None and args.limit < 1:
            raise UserInputError("--limit must be at least 1")
        device = args.device or default_device()
        output_path = args.output_path or Path("logs") / "lmms_eval" / args.model_path.resolve().name
        if args.tasks and is_embedded_derived(args.model_path):
            # its word-level vocabulary cannot even spell a real benchmark's questions
            print(f"=== {args.model_path} is the embedded tiny LLaVA-NeXT or derived from it: running the local "
                  f"task {TASK_NAME}, NOT the requested tasks {args.tasks} ===", file=sys.stderr)
            args.tasks = None
        if args.tasks:
            extra = ["--limit", str(args.limit)] if args.limit else []
            command = lmms_eval_command(args.model_path, args.tasks, output_path, device, False, extra=extra)
            print("+ " + " ".join(command), file=sys.stderr)
            before = results_files(output_path)
            status = subprocess.run(command).returncode
            # lmms-eval 0.7.3 logs a failed evaluation and still exits 0: a results file says it ran
            if status == 0 and not results_files(output_path) - before:
                print(f"error: lmms-eval wrote no results under {output_path} (its log above says why)", file=sys.stderr)
                return 1
            return status
        if args.data_path is None:
            print(f"=== lmms-eval: local task {TASK_NAME} on the EMBEDDED synthetic eval split "
                  f"{paths.EVAL_DATA_PATH} (no DATA_PATH given) ===", file=sys.stderr)
            data_path, image_folder = paths.EVAL_DATA_PATH, args.image_folder or paths.EVAL_IMAGE_FOLDER
        else:
            data_path, image_folder = args.data_path, args.image_folder or args.data_path.parent
        result = run_local(args.model_path, data_path, image_folder, output_path, device, args.limit)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    predictions = result.pop("predictions")
    if args.predictions is not None:
        with open(args.predictions, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in predictions)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
