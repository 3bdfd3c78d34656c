"""End to end: the bash scripts on the embedded LLaVA-NeXT default, reload of the outputs, and the
bad inputs that must stop a run with a one-line error and no output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llava.embedded import paths as embedded
from script_runs import (ROOT, assert_clean_failure, copy_embedded_llava_data, load_tensors,
                         pruned_fraction_rest_untouched, run_bash)
from mmprune.prune.masks import nm_pattern_holds

DECODER_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_script(script, *args, env=None, check=True):
    return run_bash(ROOT / script, *args, env={"NSAMPLES": "32", **(env or {})}, check=check, timeout=600)


def is_decoder_linear(key):
    return ".layers." in key and key.endswith(".weight") and "language_model" in key and \
        any(f".{name}." in key for name in DECODER_LINEAR)


@pytest.fixture(scope="module")
def tamp_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tamp"
    proc = run_script("scripts/prune/tamp.sh", "0.5", "unstructured", "--eval_samples", "60",
                      env={"OUTPUT_DIR": str(out)})
    return out, proc


@pytest.mark.slow
def test_tamp_default_run_sparsity_untouched_parts_and_reload(tamp_output):
    out, proc = tamp_output
    assert "EMBEDDED" in proc.stderr  # the fallback is announced
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["method"] == "tamp"
    before, after = load_tensors(embedded.CHECKPOINT_DIR), load_tensors(out)
    fraction = pruned_fraction_rest_untouched(before, after, is_decoder_linear)
    assert abs(fraction - 0.5) <= 1e-3
    report = json.loads((out / "pruning_report.json").read_text())
    assert abs(report["achieved_sparsity"] - fraction) < 1e-6
    assert report["calibration"]["tokens_per_modality"]["image"] > report["calibration"]["tokens_per_modality"]["text"]
    assert set(report["time_seconds"]) >= {"capture", "das_dense_sweep", "prune_sweep"}
    assert "das" in report and "amia" in report and "evaluation" in report
    assert (out / "sparsity.png").stat().st_size > 1000
    plan = yaml.safe_load((out / "sparsity_dict.yaml").read_text())
    assert len(plan) == report["pruned_linears"]
    for entry in report["per_linear"]:
        assert abs(entry["achieved"] - entry["target"]) < 1e-3

    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(str(out))
    AutoProcessor.from_pretrained(str(out))
    for name, param in model.named_parameters():
        short = name.split("layers.")[-1] if ".layers." in name else None
        if short and "language_model" in name and any(f".{p}." in name for p in DECODER_LINEAR):
            entry = next(e for e in report["per_linear"] if e["name"] + ".weight" == name)
            assert abs(float((param == 0).float().mean()) - entry["achieved"]) < 1e-6


@pytest.mark.slow
def test_reusing_the_sparsity_dict_reproduces_the_allocation(tamp_output, tmp_path):
    out, _ = tamp_output
    again = tmp_path / "again"
    run_script("scripts/prune/tamp.sh", "0.5", "unstructured", "--sparsity_dict", str(out / "sparsity_dict.yaml"),
               "--no_eval", env={"OUTPUT_DIR": str(again)})
    first = json.loads((out / "pruning_report.json").read_text())["per_linear"]
    second = json.loads((again / "pruning_report.json").read_text())["per_linear"]
    assert [e["target"] for e in first] == [e["target"] for e in second]


@pytest.mark.slow
def test_two_four_pattern_is_exact(tmp_path):
    out = tmp_path / "nm"
    run_script("scripts/prune/tamp.sh", "0.5", "2:4", "--no_eval", env={"OUTPUT_DIR": str(out)})
    for key, tensor in load_tensors(out).items():
        if is_decoder_linear(key):
            assert nm_pattern_holds(tensor, 2, 4), key


@pytest.mark.slow
def test_wanda_script_at_0_6(tmp_path):
    out = tmp_path / "wanda"
    run_script("scripts/prune/wanda.sh", "0.6", "--no_eval", env={"OUTPUT_DIR": str(out)})
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["method"] == "wanda" and abs(report["achieved_sparsity"] - 0.6) <= 1e-3


# ---------------------------------------------------------------------------------------------
# Bad inputs: one-line error, exit status 2, nothing written.


@pytest.fixture
def small_data(tmp_path):
    """A copy of a few embedded calibration records and their images."""
    records = copy_embedded_llava_data(tmp_path / "data", 6)
    return tmp_path / "data", records


def bad_run(tmp_path, *args, env=None):
    out = tmp_path / "out"
    proc = run_script("scripts/prune/tamp.sh", *args, env=dict(env or {}, OUTPUT_DIR=str(out)), check=False)
    return proc, out


@pytest.mark.parametrize("args,needle", [
    (("1.5",), "[0, 1)"), (("-0.1",), "[0, 1)"), (("0.5", "3:4"), "3:4"), (("0.5", "2:3"), "2:3"),
])
def test_bad_sparsity_arguments(tmp_path, args, needle):
    assert_clean_failure(*bad_run(tmp_path, *args), needle)


def test_bad_pattern_through_python_entry_point(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "llava.pruners", "--sparsity_type", "3:4", "--save_model", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert_clean_failure(proc, out, "3:4")


def test_missing_model_path(tmp_path):
    assert_clean_failure(*bad_run(tmp_path, env={"MODEL_PATH": str(tmp_path / "nope")}), "does not exist")


def test_missing_image(tmp_path, small_data):
    folder, records = small_data
    (folder / records[2]["image"]).unlink()
    env = {"DATA_PATH": str(folder / "data.json"), "NSAMPLES": "6"}
    assert_clean_failure(*bad_run(tmp_path, env=env), "does not exist")


def test_corrupt_png(tmp_path, small_data):
    folder, records = small_data
    (folder / records[1]["image"]).write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    env = {"DATA_PATH": str(folder / "data.json"), "NSAMPLES": "6"}
    assert_clean_failure(*bad_run(tmp_path, env=env), records[1]["image"].split("/")[-1])


def test_malformed_json(tmp_path, small_data):
    folder, _ = small_data
    (folder / "data.json").write_text('[{"id": 1, "image": "x.png", "conversations": [}')
    assert_clean_failure(*bad_run(tmp_path, env={"DATA_PATH": str(folder / "data.json")}), "not valid JSON")


def test_unknown_task(tmp_path):
    assert_clean_failure(*bad_run(tmp_path, env={"TASK_NAME": "no_such_task"}), "sharegpt4v")


def test_existing_output_folder_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_script("scripts/prune/tamp.sh", env={"OUTPUT_DIR": str(out)}, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr.strip().splitlines()[-1]
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_output_inside_the_input_checkpoint_is_refused(tmp_path):
    target = Path(embedded.CHECKPOINT_DIR) / "pruned"
    proc = run_script("scripts/prune/tamp.sh", env={"OUTPUT_DIR": str(target)}, check=False)
    assert proc.returncode == 2 and "never modified" in proc.stderr
    assert not target.exists()
