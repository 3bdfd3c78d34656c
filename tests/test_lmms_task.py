"""llava.lmms_task's parts that need neither lmms-eval nor a model: what the task asks and how it
scores (the end-to-end comparison with llava.eval is tests/lmms_eval, in the lmms-eval venv)."""

import pytest

from llava import data, lmms_task
from llava.embedded import paths
from mmprune.base.errors import UserInputError


def test_every_embedded_record_becomes_its_question_and_answer():
    for record in data.load_records(paths.EVAL_DATA_PATH):
        row = lmms_task.task_record(record)
        assert row["answer"] == data.reference_answer(record)
        # llava_hf sends "<image>\n" + question: the text encode_record renders for this record
        assert f"{data.IMAGE_PLACEHOLDER}\n{row['question']}" == record["conversations"][0]["value"].strip()


@pytest.mark.parametrize("record, match", [
    ({"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nq"}]}, "one question"),
    ({"id": "b", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "no image"),
    ({"id": "c", "image": "x.png", "conversations": [{"from": "human", "value": "q <image>"},
                                                     {"from": "gpt", "value": "a"}]}, "not at the start"),
])
def test_records_llava_hf_would_prompt_differently_are_refused(record, match):
    with pytest.raises(UserInputError, match=match):
        lmms_task.task_record(record)


def test_scoring_is_llava_eval_normalisation():
    doc = {"answer": "Two"}
    assert lmms_task.process_results(doc, [" two. "]) == {"accuracy": 1.0}
    assert lmms_task.process_results(doc, ["two shapes"]) == {"accuracy": 0.0}


def test_summary_checks_lmms_eval_against_its_samples():
    docs = [{"id": "r0", "kind": "color", "answer": "red"}, {"id": "r1", "kind": "", "answer": "one"}]
    samples = [{"doc_id": 1, "filtered_resps": "two", "accuracy": 0.0},
               {"doc_id": 0, "filtered_resps": ["red"], "accuracy": 1.0}]
    results = {"results": {lmms_task.TASK_NAME: {"accuracy,none": 0.5}}}
    summary = lmms_task.summarize(results, samples, docs)
    assert summary["accuracy"] == 0.5 and summary["per_kind"] == {"color": {"n": 1, "accuracy": 1.0}}
    assert [p["prediction"] for p in summary["predictions"]] == ["red", "two"]
    results["results"][lmms_task.TASK_NAME]["accuracy,none"] = 1.0
    with pytest.raises(UserInputError, match="samples give 0.5"):
        lmms_task.summarize(results, samples, docs)


def test_model_args_load_like_llava_eval():
    assert lmms_task.model_args("m", "cpu", True).endswith("device=cpu,device_map=cpu,dtype=float32")
    assert lmms_task.model_args("m", "cuda", True).endswith("device=cuda,device_map=cuda,dtype=bfloat16")
    assert lmms_task.model_args("m", "cuda", False).endswith("device_map=auto")


def test_embedded_and_pruned_checkpoints_are_recognised(tmp_path):
    assert lmms_task.is_embedded_derived(paths.CHECKPOINT_DIR)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert not lmms_task.is_embedded_derived(tmp_path)
