"""What tests/lmms_eval and tests/vllm_check share: the TAMP 50% copy they check, llava.eval's answers on
the embedded held-out split, and the record-by-record comparison with the other engine's answers."""

from __future__ import annotations

from pathlib import Path

import torch

from llava import data
from llava.convert import load_model
from llava.embedded import paths
from llava.eval import evaluate


def tamp_pruned(model_dir: Path, out: Path, nsamples: int, *extra: str) -> Path:
    """TAMP 50% unstructured on `model_dir`, saved in `out`, as scripts/prune/tamp.sh 0.5 runs it but with
    `nsamples` calibration samples (no vision-tower pruning, no evaluation; `extra`: more pruner flags)."""
    from llava.pruners.__main__ import main as prune_main

    argv = ["--method", "tamp", "--llm_sparsity_ratio", "0.5", "--sparsity_type", "unstructured",
            "--seed", "42", "--nsamples", str(nsamples), "--vit_sparsity_ratio", "0", "--no_eval",
            "--model_path", str(model_dir), "--data_path", str(paths.DATA_PATH),
            "--image_folder", str(paths.IMAGE_FOLDER), "--task_split_path", str(paths.TASK_SPLIT_PATH),
            "--save_model", str(out), "--device", "cpu", *extra]
    assert prune_main(argv) == 0
    return out


def llava_eval_predictions(model_dir) -> tuple:
    torch.set_num_threads(1)
    model, processor = load_model(model_dir, "cpu")
    predictions = []
    result = evaluate(model, processor, data.load_records(paths.EVAL_DATA_PATH), paths.EVAL_IMAGE_FOLDER,
                      progress=False, predictions=predictions)
    return result, predictions


def differing_predictions(our_preds: list[dict], their_preds: list[dict]) -> list[tuple]:
    """(id, llava.eval's answer, the other's) of each record answered or scored differently; both lists
    must name the same records in the same order."""
    assert [p["id"] for p in their_preds] == [p["id"] for p in our_preds]
    return [(a["id"], a["prediction"], b["prediction"]) for a, b in zip(our_preds, their_preds)
            if a["prediction"] != b["prediction"] or a["correct"] != b["correct"]]


def assert_same_scores(ours: dict, theirs: dict) -> None:
    """The 300 records scored alike: the same accuracy, overall and per question kind."""
    assert theirs["n"] == ours["n"] == 300
    assert theirs["accuracy"] == ours["accuracy"]
    assert {k: v["accuracy"] for k, v in theirs["per_kind"].items()} == \
        {k: v["accuracy"] for k, v in ours["per_kind"].items()}


def assert_engine_agrees(which: str, model_dir, engine_predictions, capsys, timing=lambda theirs: "") -> None:
    """llava.eval and another engine (`engine_predictions(model_dir)` -> its summary and predictions)
    answer and score every record of `model_dir` alike; prints one line on both (`timing`: its tail)."""
    ours, our_preds = llava_eval_predictions(model_dir)
    theirs, their_preds = engine_predictions(model_dir)
    differing = differing_predictions(our_preds, their_preds)
    with capsys.disabled():
        print(f"\n{which} ({model_dir}): llava.eval accuracy {ours['accuracy']:.4f}, {theirs['evaluator']} "
              f"accuracy {theirs['accuracy']:.4f}, {len(our_preds) - len(differing)}/{len(our_preds)} answers "
              f"equal{timing(theirs)}")
    assert not differing, f"{len(differing)} records differ (id, llava.eval, {theirs['evaluator']}): {differing[:10]}"
    assert_same_scores(ours, theirs)
