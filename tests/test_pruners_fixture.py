"""`python -m llava.pruners` in-process on the random tiny fixture: both checkpoint layouts,
every preset, vision-tower pruning, and the model parts that must stay untouched."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures_llava import build_tiny_llava_next, build_tiny_lmms_lab, write_image_data
from llava.pruners.__main__ import main


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixture")
    hf = build_tiny_llava_next(root / "hf")
    lmms = build_tiny_lmms_lab(hf, root / "lmms")
    data = root / "data"
    write_image_data(data, [(40, 56), (56, 56), (56, 40), (28, 28), (40, 40), (56, 28)])
    return hf, lmms, data


def run(fixture_dirs, tmp_path, *extra, layout="hf"):
    hf, lmms, data = fixture_dirs
    out = tmp_path / "out"
    argv = ["--model_path", str(hf if layout == "hf" else lmms), "--data_path", str(data / "data.json"),
            "--nsamples", "4", "--save_model", str(out), "--no_eval", *extra]
    assert main(argv) == 0
    return out, json.loads((out / "pruning_report.json").read_text())


@pytest.mark.parametrize("method", ["wanda", "das", "amia", "tamp"])
def test_every_preset_hits_the_target(fixture_dirs, tmp_path, method):
    _, report = run(fixture_dirs, tmp_path, "--method", method)
    assert report["method"] == method
    assert abs(report["achieved_sparsity"] - 0.5) <= 1e-3
    assert ("das" in report) == (method in ("das", "tamp"))
    assert ("amia" in report) == (method in ("amia", "tamp"))


def test_public_flags_map_to_tamp(fixture_dirs, tmp_path):
    _, report = run(fixture_dirs, tmp_path, "--prune_method", "wanda", "--token_selection", "amia",
                    "--score_method", "density_sum", "--sparsity_ratio_granularity", "layer")
    assert report["method"] == "tamp" and report["options"]["das_granularity_resolved"] == "linear"


@pytest.mark.parametrize("options", [
    ["--similarity_mode", "mean", "--allocation", "inverse", "--das_granularity", "block"],
    ["--amia_features", "input", "--amia_scope", "block"],
])
def test_semantic_options_run(fixture_dirs, tmp_path, options):
    _, report = run(fixture_dirs, tmp_path, "--method", "tamp", *options)
    assert abs(report["achieved_sparsity"] - 0.5) <= 1e-3


def test_floor_rounding_never_exceeds_a_linear_target(fixture_dirs, tmp_path):
    _, report = run(fixture_dirs, tmp_path, "--method", "das", "--row_rounding", "floor")
    for entry in report["per_linear"]:
        in_features = entry["shape"][1]
        assert entry["target"] - 1 / in_features - 1e-6 <= entry["achieved"] <= entry["target"] + 1e-6


def test_lmms_lab_layout_converts_on_load_and_vision_tower_pruning(fixture_dirs, tmp_path):
    out, report = run(fixture_dirs, tmp_path, "--method", "wanda", "--vit_sparsity_ratio", "0.3", layout="lmms")
    assert abs(report["vision_tower"]["achieved_sparsity"] - 0.3) <= 1e-3
    tensors = {}
    for file in out.glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    vision = [t for k, t in tensors.items() if "vision_tower" in k and "layers" in k and k.endswith("proj.weight")
              and t.dim() == 2]
    assert vision and all(abs(float((t == 0).float().mean()) - 0.3) < 0.02 for t in vision)


def test_input_checkpoint_is_not_modified(fixture_dirs, tmp_path):
    hf = fixture_dirs[0]
    before = {p.name: p.read_bytes() for p in hf.iterdir() if p.is_file()}
    run(fixture_dirs, tmp_path, "--method", "tamp")
    assert before == {p.name: p.read_bytes() for p in hf.iterdir() if p.is_file()}


def test_report_and_summary_hold_the_realtext_perplexity(fixture_dirs, tmp_path, capsys):
    from llava.convert import load_llava_next
    from mmprune.evaluate.realtext import realtext_perplexity

    _, report = run(fixture_dirs, tmp_path, "--method", "wanda", "--realtext_tokens", "600")
    dense, pruned = report["realtext"]["dense"], report["realtext"]["pruned"]
    assert dense["tokens"] == pruned["tokens"] == 600 and dense["sha256"] == pruned["sha256"]
    model, processor = load_llava_next(str(fixture_dirs[0]), dtype=torch.float32)
    assert dense["perplexity"] == pytest.approx(realtext_perplexity(model, processor.tokenizer, 600).perplexity,
                                                rel=1e-6)  # measured before pruning
    assert pruned["perplexity"] != dense["perplexity"]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["pruned_realtext_perplexity"] == pruned["perplexity"]
    _, report = run(fixture_dirs, tmp_path / "off", "--method", "wanda", "--realtext_tokens", "0")
    assert "realtext" not in report
