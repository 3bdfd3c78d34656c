"""Which embedded model a run without paths uses, and how the results tables name and read it."""

import json

import pytest

from llava import quality
from llava.embedded import paths
from videollama2.embedded import paths as av_paths
from mmprune.run import quality as grid
from mmprune.base.errors import UserInputError


def test_embedded_model_choice(monkeypatch):
    monkeypatch.setenv("EMBEDDED_MODEL", "tiny")
    assert paths.default_checkpoint() == paths.CHECKPOINT_DIR
    monkeypatch.delenv("EMBEDDED_MODEL")
    assert paths.embedded_choice() == "smol"  # the default without the variable
    monkeypatch.setenv("EMBEDDED_MODEL", "large")
    with pytest.raises(UserInputError, match="EMBEDDED_MODEL='large' is not one of smol, tiny"):
        paths.default_checkpoint()


@pytest.mark.parametrize("tree", [paths, av_paths])
def test_banner_names_the_embedded_model_and_a_real_checkpoint_wins(tree, monkeypatch, tmp_path):
    monkeypatch.setenv("EMBEDDED_MODEL", "tiny")
    monkeypatch.chdir(tmp_path)  # the real checkpoint's path is relative to the repository root

    class Args:
        model_path = None

    notes = []
    assert tree.resolve_model(Args, notes) is True
    assert Args.model_path == str(tree.CHECKPOINT_DIR)
    assert len(notes) == 1 and f"{tree.REAL_MODEL} not found -> EMBEDDED tiny" in notes[0]
    (tmp_path / tree.REAL_MODEL).mkdir(parents=True)
    Args.model_path, notes = None, []
    assert tree.resolve_model(Args, notes) is False
    assert Args.model_path == tree.REAL_MODEL and notes == []


def test_results_of_the_tiny_model_are_kept_apart():
    class Args:
        model_path = str(paths.CHECKPOINT_DIR)

    assert quality.output_names(Args) == {"section": "weight-pruning-tiny", "json": "results_tiny.json",
                                          "plot": "results_accuracy_tiny.png"}
    Args.model_path = str(paths.SMOL_CHECKPOINT_DIR)
    assert quality.output_names(Args) == {"section": "weight-pruning", "json": "results.json",
                                          "plot": "results_accuracy.png"}
    assert "SmolLM2" in paths.model_title(Args.model_path)


def run(method, setting, ppl):
    return {"method": method, "setting": setting, "realtext": {"perplexity": ppl}}


def test_realism_check_states_the_measured_ordering_either_way():
    dense = {"realtext": {"perplexity": 20.0}}
    by_key = {("magnitude", "0.5"): [run("magnitude", "0.5", 700.0)],
              ("wanda", "0.5"): [run("wanda", "0.5", 50.0), run("wanda", "0.5", 60.0)]}
    text = " ".join(grid.realism_check({"dense": dense}, by_key))
    assert "magnitude 700.0, Wanda 55.0" in text and "holds: Wanda's is below" in text
    by_key[("wanda", "0.5")] = [run("wanda", "0.5", 900.0)]
    assert "does NOT hold" in " ".join(grid.realism_check({"dense": dense}, by_key))
    assert grid.realism_check({"dense": {}}, by_key) == []  # not measured: no claim


def test_table_cells_mark_diverged_runs():
    by_key = {("wanda", "0.8"): [run("wanda", "0.8", 10.0), run("wanda", "0.8", None)],
              ("wanda", "0.5"): [run("wanda", "0.5", None)]}
    lines = grid.table("t", ["0.5", "0.8", "2:4"], "5.0", ["wanda"], by_key, grid.realtext_value, 1)
    assert lines[-1] == "| wanda | diverged | 10.0 (1 diverged) | — |"


def test_partials_merge_in_table_order_with_the_one_dense_result(tmp_path):
    class Args:
        seeds = [42, 43]
        methods = ["magnitude", "wanda", "tamp"]

    def unit(path, method, seed, dense=None):
        runs = [{"method": method, "seed": seed, "setting": s} for s in ("0.5", "2:4")]
        path.write_text(json.dumps({"dense": dense, "runs": runs, "minutes": 2.0}))
        return str(path)

    files = [unit(tmp_path / "a.json", "tamp", 42), unit(tmp_path / "b.json", "wanda", 43),
             unit(tmp_path / "c.json", "magnitude", 42, dense={"accuracy": 0.9}), unit(tmp_path / "d.json", "wanda", 42)]
    merged = grid.merge_partials(Args, files)
    assert merged["dense"] == {"accuracy": 0.9} and merged["minutes"] == 8.0 and merged["merged"]
    assert [(r["method"], r["seed"], r["setting"]) for r in merged["runs"]] == [
        ("magnitude", 42, "0.5"), ("magnitude", 42, "2:4"), ("wanda", 42, "0.5"), ("wanda", 42, "2:4"),
        ("tamp", 42, "0.5"), ("tamp", 42, "2:4"), ("wanda", 43, "0.5"), ("wanda", 43, "2:4")]
    with pytest.raises(UserInputError, match="dense"):
        grid.merge_partials(Args, files[:2])
