"""End to end: the VideoLLaMA2-AV bash scripts on the embedded default, reload of the outputs, the
eval entry point, and the bad inputs that must stop a run with a one-line error and no output."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmprune.prune.masks import nm_pattern_holds
from mmprune.prune.pipeline import PRESETS
from script_runs import ROOT, assert_clean_failure, load_tensors, pruned_fraction_rest_untouched, run_bash
from videollama2.embedded import paths as embedded

SCRIPTS = ROOT / "scripts_videollama2" / "prune"
SIX_TERMS = {"text-text", "text-video", "text-audio", "video-video", "video-audio", "audio-audio"}
needs_checkpoint = pytest.mark.skipif(not (embedded.CHECKPOINT_DIR / "config.json").is_file(),
                                      reason="the embedded VideoLLaMA2-AV checkpoint is not built")


def run_script(name, *args, env=None, check=True):
    return run_bash(SCRIPTS / name, *args, env=env, check=check)


def is_decoder_linear(key):
    return key.startswith("model.layers.") and key.endswith("proj.weight")


@pytest.fixture(scope="module")
def tamp_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tamp"
    proc = run_script("tamp.sh", "--eval_samples", "90", env={"OUTPUT_DIR": str(out)})
    return out, proc


@pytest.mark.slow
@needs_checkpoint
def test_tamp_default_run_sparsity_untouched_parts_report_and_reload(tamp_output):
    out, proc = tamp_output
    assert "EMBEDDED" in proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["method"] == "tamp" and abs(summary["achieved_sparsity"] - 0.5) <= 1e-3
    before, after = load_tensors(embedded.CHECKPOINT_DIR), load_tensors(out)
    fraction = pruned_fraction_rest_untouched(before, after, is_decoder_linear)
    assert abs(fraction - 0.5) <= 1e-3
    report = json.loads((out / "pruning_report.json").read_text())
    counts = report["calibration"]["tokens_per_modality"]
    assert set(counts) == {"text", "video", "audio"}
    assert counts["video"] == 128 * report["calibration"]["video_tokens_per_sample"]
    assert counts["audio"] == 128 * report["calibration"]["audio_tokens_per_sample"]
    assert counts["video"] + counts["audio"] > counts["text"] > 0
    assert len(report["das"]["group_terms"]) == report["pruned_linears"]
    assert all(set(terms) == SIX_TERMS for terms in report["das"]["group_terms"].values())
    assert "text-audio" in proc.stderr and "calibration tokens: text" in proc.stderr
    assert {"dense", "pruned"} <= set(report["evaluation"])
    assert set(report["evaluation"]["pruned"]["per_kind"]) == {"video", "audio", "both"}
    assert (out / "sparsity.png").stat().st_size > 1000
    plan = yaml.safe_load((out / "sparsity_dict.yaml").read_text())
    assert len(plan) == report["pruned_linears"]
    from videollama2.adapter import load_videollama2
    model, tokenizer = load_videollama2(out)
    for entry in report["per_linear"]:
        weight = model.get_parameter(entry["name"] + ".weight")
        assert abs(float((weight == 0).float().mean()) - entry["achieved"]) < 1e-6
    assert {p.name for p in out.iterdir()} >= {p.name for p in embedded.CHECKPOINT_DIR.iterdir()}


@pytest.mark.slow
@needs_checkpoint
def test_eval_entry_point_on_the_pruned_output(tamp_output):
    out, _ = tamp_output
    proc = subprocess.run([sys.executable, "-m", "videollama2.eval", "--model_path", str(out), "--max_samples", "30"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["n"] == 30 and 0 <= result["accuracy"] <= 1 and result["answer_perplexity"] > 1
    assert set(result["per_kind"]) == {"video", "audio", "both"}


@pytest.mark.slow
@needs_checkpoint
def test_two_four_pattern_is_exact(tmp_path):
    out = tmp_path / "nm"
    run_script("tamp.sh", "0.5", "2:4", "--no_eval", env={"OUTPUT_DIR": str(out), "NSAMPLES": "32"})
    for key, tensor in load_tensors(out).items():
        if is_decoder_linear(key):
            assert nm_pattern_holds(tensor, 2, 4), key


@pytest.mark.slow
@needs_checkpoint
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude", "owl", "ecoflap"])
def test_other_scripts_at_0_6(tmp_path, method):
    if method not in PRESETS:
        pytest.skip(f"the core has no {method} preset yet")
    out = tmp_path / method
    run_script(f"{method}.sh", "0.6", "--no_eval", env={"OUTPUT_DIR": str(out), "NSAMPLES": "16"})
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["method"] == method and abs(report["achieved_sparsity"] - 0.6) <= 1e-3


# ---------------------------------------------------------------------------------------------
# Bad inputs: one-line error, exit status 2, nothing written.


@pytest.fixture
def small_data(tmp_path):
    """Six embedded calibration records (one with a wav) and their media, copied."""
    records = json.loads(Path(embedded.DATA_PATH).read_text())
    wav = next(r for r in records if r["audio"].endswith(".wav"))
    chosen = [r for r in records if not r["audio"].endswith(".wav")][:5] + [wav]
    folder = tmp_path / "data"
    folder.mkdir()
    for record in chosen:
        for key in ("video", "audio"):
            shutil.copy(embedded.MEDIA_FOLDER / record[key], folder / record[key])
    (folder / "data.json").write_text(json.dumps(chosen))
    return folder, chosen


def bad_run(tmp_path, *args, env=None, script="tamp.sh"):
    out = tmp_path / "out"
    proc = run_script(script, *args, env=dict(env or {}, OUTPUT_DIR=str(out)), check=False)
    return proc, out


def data_env(folder, **extra):
    return {"DATA_PATH": str(folder / "data.json"), "NSAMPLES": "6", **extra}


@needs_checkpoint
def test_video_without_audio_track_when_audio_is_needed(tmp_path, small_data):
    folder, records = small_data
    silent = records[-1]["video"]  # the wav record's mp4 is silent; point its audio at the mp4
    records[-1]["audio"] = silent
    (folder / "data.json").write_text(json.dumps(records))
    assert_clean_failure(*bad_run(tmp_path, env=data_env(folder)), f"{silent} has no audio track")


@needs_checkpoint
def test_unreadable_mp4(tmp_path, small_data):
    folder, records = small_data
    (folder / records[1]["video"]).write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 40)
    assert_clean_failure(*bad_run(tmp_path, env=data_env(folder)), f"{records[1]['video']} cannot be read")


@needs_checkpoint
def test_missing_wav(tmp_path, small_data):
    folder, records = small_data
    (folder / records[-1]["audio"]).unlink()
    assert_clean_failure(*bad_run(tmp_path, env=data_env(folder)), f"{records[-1]['audio']} does not exist")


@needs_checkpoint
def test_annotations_pointing_to_missing_files(tmp_path, small_data):
    folder, records = small_data
    (folder / records[2]["video"]).unlink()
    assert_clean_failure(*bad_run(tmp_path, env=data_env(folder)), "does not exist")


@needs_checkpoint
def test_malformed_annotations(tmp_path, small_data):
    folder, _ = small_data
    (folder / "data.json").write_text('[{"id": 1, "video": "x.mp4", "conversations": [}')
    assert_clean_failure(*bad_run(tmp_path, env=data_env(folder)), "not valid JSON")


@pytest.mark.parametrize("args,needle", [(("1.5",), "[0, 1)"), (("0.5", "3:4"), "3:4"), (("0.5", "2:3"), "2:3")])
def test_bad_sparsity_arguments(tmp_path, args, needle):
    assert_clean_failure(*bad_run(tmp_path, *args), needle)


def test_bad_tower_ratio(tmp_path):
    assert_clean_failure(*bad_run(tmp_path, env={"AUD_SPARSITY": "1.2"}), "--aud_sparsity_ratio")


def test_missing_model_path(tmp_path):
    assert_clean_failure(*bad_run(tmp_path, env={"MODEL_PATH": str(tmp_path / "nope")}), "does not exist")


def test_existing_output_folder_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_script("tamp.sh", env={"OUTPUT_DIR": str(out)}, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr.strip().splitlines()[-1]
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
