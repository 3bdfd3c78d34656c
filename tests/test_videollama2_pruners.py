"""`python -m videollama2.pruners` in-process on the random tiny fixture: every core method through
the same driver, the 6 DAS terms of three modalities, tower pruning, and the parts that must stay
untouched."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fixtures_videollama2 import AUDIO_TOKENS, VIDEO_TOKENS, build_tiny_videollama2, write_clip_data
from mmprune.prune.calibration import CalibrationStore
from mmprune.prune.allocation.das import DASConfig, DiversitySweep
from mmprune.prune.diversity import diversity_terms, term_name
from mmprune.prune.driver import sweep
from mmprune.prune.pipeline import PRESETS
from videollama2.adapter import load_videollama2
from videollama2.data import encode_record
from videollama2.media import MediaLoader
from videollama2.model import MODALITY_NAMES
from videollama2.pruners.__main__ import main
from videollama2.pruning import capture_decoder_inputs

SIX_TERMS = {"text-text", "text-video", "text-audio", "video-video", "video-audio", "audio-audio"}
METHODS = [m for m in ("tamp", "wanda", "sparsegpt", "magnitude", "owl", "ecoflap", "das", "amia") if m in PRESETS]


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl2fixture")
    model_dir = build_tiny_videollama2(root / "model")
    data = root / "data"
    write_clip_data(data, 6, "what sound do you hear ?", separate_audio=True)  # clip5's audio: a wav beside it
    return model_dir, data


def run(fixture_dirs, tmp_path, *extra):
    model_dir, data = fixture_dirs
    out = tmp_path / "out"
    argv = ["--model_path", str(model_dir), "--data_path", str(data / "data.json"), "--nsamples", "4",
            "--save_model", str(out), "--no_eval", *extra]
    assert main(argv) == 0
    return out, json.loads((out / "pruning_report.json").read_text())


def tensors(folder):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def is_decoder_linear(key):
    return key.startswith("model.layers.") and key.endswith("proj.weight")


@pytest.mark.parametrize("method", METHODS)
def test_every_core_method_runs_and_hits_the_target(fixture_dirs, tmp_path, method):
    out, report = run(fixture_dirs, tmp_path, "--method", method)
    assert report["method"] == method
    assert abs(report["achieved_sparsity"] - 0.5) <= 1e-3
    before, after = tensors(fixture_dirs[0]), tensors(out)
    assert before.keys() == after.keys()
    for key in before:
        if not is_decoder_linear(key):
            assert torch.equal(before[key], after[key]), f"{key} changed"
    if method in ("tamp", "das"):
        for group, terms in report["das"]["group_terms"].items():
            assert set(terms) == SIX_TERMS, group
    counts = report["calibration"].get("tokens_per_modality")
    if counts:
        assert counts["video"] == 4 * VIDEO_TOKENS and counts["audio"] == 4 * AUDIO_TOKENS
        assert counts["video"] + counts["audio"] > counts["text"]


def test_public_flags_and_tower_pruning(fixture_dirs, tmp_path):
    out, report = run(fixture_dirs, tmp_path, "--prune_method", "wanda", "--token_selection", "amia",
                      "--score_method", "density_sum", "--sparsity_ratio_granularity", "layer",
                      "--vit_sparsity_ratio", "0.3", "--aud_sparsity_ratio", "0.4")
    assert report["method"] == "tamp"
    assert abs(report["vision_tower"]["achieved_sparsity"] - 0.3) < 0.01
    assert abs(report["audio_tower"]["achieved_sparsity"] - 0.4) < 0.01
    before, after = tensors(fixture_dirs[0]), tensors(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder.layers.") for k in changed)
    assert any(k.startswith("model.audio_tower.encoder.layers.") for k in changed)
    allowed = ("model.layers.", "model.vision_tower.vision_tower.vision_model.encoder.layers.",
               "model.audio_tower.encoder.layers.")
    assert all(k.startswith(allowed) and k.endswith(".weight") for k in changed), changed
    assert not any("mm_projector" in k or "embed_tokens" in k or "lm_head" in k for k in changed)
    model, _ = load_videollama2(out)  # the output loads like the original
    assert model.model.layers[0].mlp.down_proj.weight.eq(0).float().mean() > 0.3


def test_six_term_das_on_spliced_samples(fixture_dirs):
    model_dir, data = fixture_dirs
    model, tokenizer = load_videollama2(model_dir)
    records = json.loads((data / "data.json").read_text())[:2]
    media = MediaLoader.for_config(model.config, model.image_size)
    samples = [encode_record(tokenizer, r, data, media) for r in records]
    store = capture_decoder_inputs(model, iter(samples), "cpu", "cpu", 2)
    assert isinstance(store, CalibrationStore) and len(store) == 2
    ids = store.modality_ids[0]
    assert int((ids == 1).sum()) == VIDEO_TOKENS and int((ids == 2).sum()) == AUDIO_TOKENS
    first_video = int((ids == 1).nonzero()[0])
    assert ids[first_video:first_video + VIDEO_TOKENS + AUDIO_TOKENS].tolist() == [1] * VIDEO_TOKENS + [2] * AUDIO_TOKENS
    assert store.labels[0].shape == (1, store.hidden[0].shape[1])
    terms = diversity_terms(store.hidden[0][0], ids)
    assert {term_name(t, MODALITY_NAMES) for t in terms} == SIX_TERMS
    assert all(0.0 <= v <= 2.0 for v in terms.values())
    diversity = DiversitySweep("model.layers", DASConfig())
    sweep(model.model.layers, store.clone(), diversity, "cpu", desc="test")
    for group in diversity.groups:
        assert len(diversity.accumulator.term_means(group)) == 6


def test_report_holds_the_realtext_perplexity(fixture_dirs, tmp_path):
    _, report = run(fixture_dirs, tmp_path, "--method", "magnitude", "--realtext_tokens", "500")
    dense, pruned = report["realtext"]["dense"], report["realtext"]["pruned"]
    assert dense["tokens"] == pruned["tokens"] == 500 and pruned["perplexity"] != dense["perplexity"]
    assert "Python" in pruned["source"] and len(pruned["sha256"]) == 64


def test_a_pruned_vision_tower_is_what_upstream_loading_reads(fixture_dirs, tmp_path):
    # upstream VideoLLaMA2 builds SigLIP from the folder `mm_vision_tower` names (only if "siglip" is
    # in the name) and ignores the tower weights in the shards
    from transformers import SiglipImageProcessor, SiglipVisionModel

    prefix = "model.vision_tower.vision_tower."
    out, report = run(fixture_dirs, tmp_path, "--method", "wanda", "--vit_sparsity_ratio", "0.5")
    config = json.loads((out / "config.json").read_text())
    name = config["mm_vision_tower"]
    source = json.loads((fixture_dirs[0] / "config.json").read_text())["mm_vision_tower"]
    assert "siglip" in name and name == str(out.resolve() / "siglip-vision-tower")
    assert config["mm_vision_tower_source"] == source
    shards, standalone = tensors(out), load_file(str(out / "siglip-vision-tower" / "model.safetensors"))
    assert standalone.keys() == {k[len(prefix):] for k in shards if k.startswith(prefix)}  # released names
    assert all(torch.equal(v, shards[prefix + k]) for k, v in standalone.items())
    tower = SiglipVisionModel.from_pretrained(name)
    SiglipImageProcessor.from_pretrained(name)
    q = shards[prefix + "vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(tower.get_parameter(tower_key(tower, "encoder.layers.0.self_attn.q_proj.weight")), q)
    assert abs(float(q.eq(0).float().mean()) - 0.5) < 0.01
    assert abs(report["vision_tower"]["achieved_sparsity"] - 0.5) < 0.01

    # pruning that output again without touching the tower keeps a tower folder of its own
    again = tmp_path / "again"
    model_dir, data = fixture_dirs
    assert main(["--model_path", str(out), "--data_path", str(data / "data.json"), "--nsamples", "4",
                 "--save_model", str(again), "--no_eval", "--method", "magnitude"]) == 0
    config = json.loads((again / "config.json").read_text())
    assert config["mm_vision_tower"] == str(again.resolve() / "siglip-vision-tower")
    assert config["mm_vision_tower_source"] == source
    tower = SiglipVisionModel.from_pretrained(config["mm_vision_tower"])
    assert torch.equal(tower.get_parameter(tower_key(tower, "encoder.layers.0.self_attn.q_proj.weight")), q)

    # a moved checkpoint still loads here (its own tower folder), while upstream would fail loudly
    moved = tmp_path / "moved"
    again.rename(moved)
    model, _ = load_videollama2(moved)
    tower = model.vision_tower.vision_tower
    assert torch.equal(tower.get_parameter(tower_key(tower, "encoder.layers.0.self_attn.q_proj.weight")), q)
    # a released-layout config (no vision_config) reads the tower's configuration from the moved folder
    from videollama2.config import VideoLLaMA2Config

    raw = json.loads((moved / "config.json").read_text())
    expected = raw.pop("vision_config")
    (moved / "config.json").write_text(json.dumps(raw))
    vision = VideoLLaMA2Config.from_dir(moved).vision_config()
    assert {k: getattr(vision, k) for k in expected} == expected


def tower_key(tower, name):
    """transformers 5 flattens SiglipVisionModel; older releases keep a `vision_model` level."""
    return f"vision_model.{name}" if hasattr(tower, "vision_model") else name


def test_a_dense_vision_tower_keeps_the_released_name(fixture_dirs, tmp_path):
    out, _ = run(fixture_dirs, tmp_path, "--method", "magnitude")
    source = json.loads((fixture_dirs[0] / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == source
    assert not (out / "siglip-vision-tower").exists()
