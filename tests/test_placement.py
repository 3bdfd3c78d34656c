"""Placement from the command line (issue 15): --device_map / --max_memory / --offload_folder on
both prune CLIs and both script trees.

* A run that sends decoder blocks to disk gives the plain run's masks and saved files, and holds
  fewer weight bytes in memory (the report's `placement.peak_memory`, measured by
  mmprune.place.offload.WeightMeter: the distinct storages of the model's real tensors and of the copies
  the run holds, summed after every change that adds any, so its high-water mark is exact and the
  same on every run). The slow test compares the process's peak resident set size on a wider model.
* Saving an offloaded model copies at most one shard plus one block into CPU memory (the meter's
  `copies_peak`: every weight read from disk or copied to be written is a tracked storage; a
  storage counts until it is freed, which torch's reference counting makes deterministic).
* Bad placements end in one `error:` line before any weight is loaded.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmprune.base.entry import run_main
from mmprune.place.offload import metering
from script_runs import ROOT, load_tensors
from videollama2.embedded import paths as av_embedded

LLAVA = ROOT / "checkpoints" / "embedded" / "llava-next-tiny"
AV = ROOT / "checkpoints" / "embedded" / "videollama2-av-tiny"
FAST = ["--method", "tamp", "--llm_sparsity_ratio", "0.5", "--nsamples", "8", "--no_eval", "--realtext_tokens", "0",
        "--device", "cpu"]


def llava_main(argv):
    from llava.pruners.__main__ import main

    return main(argv)


def av_main(argv):
    from videollama2.pruners.__main__ import main

    return main(argv)


def report_of(folder) -> dict:
    return json.loads((Path(folder) / "pruning_report.json").read_text())


def weight_files(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin") or
                  p.name.endswith(".index.json"))


def assert_same_checkpoint(plain: Path, placed: Path) -> None:
    """Same weight files, index and config; every tensor (so every mask) identical."""
    assert weight_files(plain) == weight_files(placed)
    for name in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        if (plain / name).exists():
            assert (plain / name).read_text() == (placed / name).read_text(), name
    expected, got = load_tensors(plain), load_tensors(placed)
    assert expected.keys() == got.keys()
    pruned = 0
    for key, tensor in expected.items():
        assert torch.equal(tensor == 0, got[key] == 0), f"{key}: masks differ"
        assert torch.equal(tensor, got[key]), f"{key}: values differ"
        pruned += ".layers." in key and bool((tensor == 0).float().mean() > 0.3)
    assert pruned >= 7  # the decoder really was pruned


MODELS = {
    "llava": (llava_main, ["--model_path", str(LLAVA)], "cpu:6MiB"),
    "videollama2": (av_main, ["--model_path", str(AV), "--data_path", str(av_embedded.DATA_PATH),
                              "--data_folder", str(av_embedded.MEDIA_FOLDER)], "cpu:5MiB"),
}


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """The plain run of each model (no placement), 1 MB shards so that saving writes several."""
    root = tmp_path_factory.mktemp("plain")
    for name, (main, model, _) in MODELS.items():
        assert main(FAST + model + ["--max_shard_size", "1MB", "--save_model", str(root / name)]) == 0
    return root


@pytest.mark.parametrize("model", list(MODELS))
def test_blocks_on_disk_prune_and_save_like_the_plain_run_with_fewer_weights_in_memory(plain_runs, tmp_path, model):
    main, model_args, budget = MODELS[model]
    out, offload = tmp_path / "placed", tmp_path / "offload"
    assert main(FAST + model_args + ["--max_shard_size", "1MB", "--max_memory", budget, "--offload_folder",
                                     str(offload), "--save_model", str(out)]) == 0
    assert_same_checkpoint(plain_runs / model, out)

    plain, placed = report_of(plain_runs / model)["placement"], report_of(out)["placement"]
    blocks = placed["blocks_per_device"]
    assert blocks.get("disk", 0) >= sum(blocks.values()) / 2, blocks  # at least half of the decoder on disk
    assert placed["max_memory_bytes"]["cpu"] == int(budget[4:-3]) * 2 ** 20
    # fewer weight bytes were ever in memory at once than in the plain run, which holds them all
    held, held_plain = placed["peak_memory"]["cpu"]["weights_peak_bytes"], plain["peak_memory"]["cpu"]["weights_peak_bytes"]
    assert held < held_plain, (held, held_plain)
    assert held_plain >= sum(t.numel() * t.element_size() for t in load_tensors(plain_runs / model).values()) * 0.99
    assert placed["peak_memory"]["cpu"]["max_rss_bytes"] > 0
    # every block on disk read back and written pruned into the run's own offload folder, then removed
    io = placed["offload_io"]
    assert io["written_bytes"] == blocks["disk"] * placed["plan"]["block_bytes"]
    assert io["read_bytes"]["offload_folder"] >= io["written_bytes"] and io["read_bytes"]["checkpoint"] > 0
    assert not offload.exists()
    assert plain["device_map"] is None and plain["offload_io"]["written_bytes"] == 0
    # saving copied at most one shard (1 MB) plus one block into memory
    assert 0 < placed["save_copies_peak_bytes"] <= 10 ** 6 + placed["plan"]["block_bytes"]


JSON_MAPS = {  # towers on disk, decoder blocks alternating between the CPU and disk
    "llava": {"model.vision_tower": "disk", "model.multi_modal_projector": "disk", "model.image_newline": "cpu",
              "model.language_model.embed_tokens": "cpu", "model.language_model.rotary_emb": "cpu",
              "model.language_model.norm": "cpu", "lm_head": "disk",
              **{f"model.language_model.layers.{i}": ("disk", "cpu")[i % 2] for i in range(4)}},
    # "" for the rest, with entries inside it: the plan makes them disjoint for accelerate
    "videollama2": {"": "cpu", "model.vision_tower": "disk", "model.audio_tower": "disk", "model.mm_projector": "disk",
                    "model.mm_projector_a": "disk", **{f"model.layers.{i}": ("disk", "cpu")[i % 2] for i in range(4)}},
}


@pytest.mark.parametrize("model", list(MODELS))
def test_towers_on_disk_and_blocks_on_alternate_devices_from_a_json_map(plain_runs, tmp_path, model):
    """Calibration capture runs the towers where the map puts them (disk), apart from the decoder."""
    main, model_args, _ = MODELS[model]
    (tmp_path / "map.json").write_text(json.dumps(JSON_MAPS[model]))
    out = tmp_path / "placed"
    assert main(FAST + model_args + ["--max_shard_size", "1MB", "--device_map", str(tmp_path / "map.json"),
                                     "--offload_folder", str(tmp_path / "off"), "--save_model", str(out)]) == 0
    assert_same_checkpoint(plain_runs / model, out)
    placed = report_of(out)["placement"]
    assert placed["blocks_per_device"] == {"disk": 2, "cpu": 2}
    towers = [name for name, device in placed["device_map"].items() if "tower" in name]
    assert towers and all(placed["device_map"][name] == "disk" for name in towers)


@pytest.mark.parametrize("method", ["magnitude", "ecoflap"])
def test_methods_with_their_own_block_access_on_offloaded_blocks(tmp_path, method):
    """Magnitude prunes without the driver's sweep, ECoFLaP brings the whole decoder in at once:
    both on blocks placed on disk give the plain run's weights."""
    assert FAST[:2] == ["--method", "tamp"]
    common = FAST[2:] + MODELS["llava"][1] + ["--method", method, "--nsamples", "4", "--max_shard_size", "1MB"]
    assert llava_main(common + ["--save_model", str(tmp_path / "plain")]) == 0
    assert llava_main(common + ["--max_memory", "cpu:6MiB", "--offload_folder", str(tmp_path / "off"),
                                "--save_model", str(tmp_path / "placed")]) == 0
    assert report_of(tmp_path / "placed")["placement"]["blocks_per_device"].get("disk", 0) >= 2
    assert_same_checkpoint(tmp_path / "plain", tmp_path / "placed")


# --------------------------------------------------------------------------------------------- saving


def _offloaded_llava(offload_dir):
    from llava.convert import load_llava_next

    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.image_newline": "cpu",
                  "model.language_model.embed_tokens": "cpu", "model.language_model.rotary_emb": "cpu",
                  "model.language_model.norm": "cpu", "model.language_model.layers": "disk", "lm_head": "disk"}
    return load_llava_next(LLAVA, dtype=torch.float32, device_map=device_map, offload_folder=offload_dir)[0]


@pytest.mark.parametrize("shard", [300_000, 1_000_000])
def test_saving_an_offloaded_llava_copies_one_shard_at_most(tmp_path, shard):
    from llava.adapter import llava_hf_names, save_weights
    from llava.placed_save import save_placed

    model = _offloaded_llava(tmp_path / "offload")
    block = sum(p.numel() * p.element_size() for p in model.model.language_model.layers[0].parameters())
    on_disk = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_meta)
    with metering(model) as meter:
        save_placed(model, tmp_path / "out", llava_hf_names(model), max_shard_size=shard)
    # bounded by a shard and a block, and far below everything on disk: the files were written one by one
    assert 0 < meter.copies_peak <= shard + block, (meter.copies_peak, shard, block)
    assert meter.copies_peak < on_disk / 2
    assert meter.read_bytes["checkpoint"] == on_disk  # each offloaded weight read exactly once

    reference = tmp_path / "reference"
    from transformers import LlavaNextForConditionalGeneration

    # the same writer on the model loaded whole: the same files, shard for shard
    save_weights(LlavaNextForConditionalGeneration.from_pretrained(LLAVA, dtype=torch.float32), reference,
                 max_shard_size=shard)
    assert weight_files(reference) == weight_files(tmp_path / "out")
    assert (reference / "model.safetensors.index.json").read_text() == \
        (tmp_path / "out" / "model.safetensors.index.json").read_text()
    expected, got = load_tensors(reference), load_tensors(tmp_path / "out")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_saving_an_offloaded_videollama2_copies_one_shard_at_most(tmp_path):
    from videollama2.checkpoint import save_model
    from videollama2.model import VideoLLaMA2ForCausalLM

    plain = VideoLLaMA2ForCausalLM.from_pretrained(AV)
    device_map = {"": "cpu", "model.layers": "disk", "model.audio_tower": "disk", "lm_head": "disk"}
    (tmp_path / "offload").mkdir()
    model = VideoLLaMA2ForCausalLM.from_pretrained(AV, device_map=device_map, offload_dir=tmp_path / "offload")
    assert model.model.layers[0].mlp.down_proj.weight.is_meta
    block = sum(p.numel() * p.element_size() for p in plain.model.layers[0].parameters())
    on_disk = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_meta)
    shard = 400_000
    with metering(model) as meter:
        save_model(model, tmp_path / "out", max_shard_bytes=shard, keep_layout=False)
    assert 0 < meter.copies_peak <= shard + block, (meter.copies_peak, shard, block)
    assert meter.copies_peak < on_disk / 2
    save_model(plain, tmp_path / "reference", max_shard_bytes=shard, keep_layout=False)
    assert weight_files(tmp_path / "reference") == weight_files(tmp_path / "out")
    expected, got = load_tensors(tmp_path / "reference"), load_tensors(tmp_path / "out")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # the offloaded model still computes what the plain one does
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- errors


def _never_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    import llava.adapter
    from videollama2.model import VideoLLaMA2ForCausalLM

    monkeypatch.setattr(llava.adapter, "load_llava_next", refuse)  # what the family's adapter loads with
    monkeypatch.setattr(VideoLLaMA2ForCausalLM, "from_pretrained", refuse)


def _one_error_line(capsys, main, argv) -> str:
    assert run_main(main, argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ") and not any(line.startswith("error: ") for line in lines[:-1])
    return lines[-1]


def test_bad_placements_are_one_line_before_any_weight_is_loaded(tmp_path, capsys, monkeypatch):
    _never_load(monkeypatch)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "ghost.json").write_text(json.dumps({"": "cpu", "model.language_model.layers.9": "disk"}))
    (tmp_path / "partial.json").write_text(json.dumps({"model.language_model": "cpu", "lm_head": "cpu"}))
    (tmp_path / "gpu.json").write_text(json.dumps({"": "cuda:0"}))
    (tmp_path / "disk.json").write_text(json.dumps({"": "cpu", "lm_head": "disk"}))
    cases = [
        (["--max_memory", "npu:1GiB"], "unknown device 'npu'"),
        (["--max_memory", "cuda:7:1GiB,cpu:1GiB"], "names cuda:7, but this machine has"),
        (["--max_memory", "cpu:1MiB"], "--max_memory gives cpu 1.00 MiB, less than one decoder block plus"),
        (["--max_memory", "cpu:6MiB", "--offload_folder", "/proc/mmprune-offload"], "--offload_folder"),
        (["--max_memory", "cpu:6MiB", "--offload_folder", str(tmp_path / "a_file" / "sub")], "lies below the file"),
        (["--max_memory", "cpu:6MiB"], "pass --offload_folder DIR (or OFFLOAD_FOLDER)"),
        (["--max_memory", "cpu:6MiB", "--offload_folder", str(LLAVA / "offload")], "overlaps the input"),
        (["--device_map", str(tmp_path / "ghost.json")], "names modules the model lacks: model.language_model.layers.9"),
        (["--device_map", str(tmp_path / "partial.json")], "places no device for"),
        (["--device_map", str(tmp_path / "gpu.json")], "names cuda:0, but this machine has"),
        (["--device_map", str(tmp_path / "disk.json")], "pass --offload_folder"),
        (["--device_map", "fastest"], "neither auto, balanced, sequential nor a JSON file"),
        (["--max_memory", "cpu:6MiB", "--max_shard_size", "big"], "--max_shard_size"),
    ]
    if torch.cuda.is_available():
        cases = [c for c in cases if "cuda:0" not in c[1]]
    for flags, needle in cases:
        out = tmp_path / "out"
        line = _one_error_line(capsys, llava_main, FAST + MODELS["llava"][1] + ["--max_shard_size", "1MB"] + flags
                               + ["--save_model", str(out)])
        assert needle in line, (flags, line)
        assert not out.exists()
    assert not Path("/proc/mmprune-offload").exists()
    for flags, needle in [(["--max_memory", "cpu:100KiB"], "less than one decoder block"),
                          (["--device_map", str(tmp_path / "ghost.json")], "names modules the model lacks")]:
        line = _one_error_line(capsys, av_main, FAST + MODELS["videollama2"][1] + flags + ["--save_model",
                                                                                          str(tmp_path / "av")])
        assert needle in line, (flags, line)


# --------------------------------------------------------------------------------------------- scripts


def test_scripts_pass_the_placement_variables(tmp_path):
    """DEVICE_MAP, MAX_MEMORY and OFFLOAD_FOLDER become flags; a map file and the folder are taken
    from the caller's directory, a mode name is left alone."""
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    stub.chmod(0o755)
    for script in ("scripts/prune/tamp.sh", "scripts_videollama2/prune/tamp.sh"):
        for device_map, expected in (("auto", "auto"), ("maps/m.json", f"{tmp_path}/maps/m.json")):
            env = {**os.environ, "PYTHON": str(stub), "DEVICE_MAP": device_map, "MAX_MEMORY": "0:20GiB,cpu:60GiB",
                   "OFFLOAD_FOLDER": "off"}
            done = subprocess.run(["bash", str(ROOT / script), "0.5", "--offload_folder", "other",
                                   "--device_map=sequential"], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  check=True)
            args = done.stdout.splitlines()
            pairs = list(zip(args, args[1:]))
            assert ("--device_map", expected) in pairs and ("--max_memory", "0:20GiB,cpu:60GiB") in pairs
            assert ("--offload_folder", f"{tmp_path}/off") in pairs
            # flags after the variables win (argparse keeps the last); both made absolute the same way
            assert ("--offload_folder", f"{tmp_path}/other") in pairs and "--device_map=sequential" in args


# --------------------------------------------------------------------------------------------- peak RSS


def _wide_llava(folder: Path) -> Path:
    """The embedded LLaVA-NeXT with a 16x wider decoder (random weights, 63 MB per block), so the
    weights dominate the process's memory."""
    from transformers import AutoConfig, LlavaNextForConditionalGeneration

    config = AutoConfig.from_pretrained(LLAVA)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 1024, 4096, 8, 4
    text.head_dim = 128
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).eval().save_pretrained(folder)
    for entry in LLAVA.iterdir():
        if entry.name != "config.json" and not entry.name.endswith(".safetensors"):
            shutil.copy(entry, folder / entry.name)
    return folder


def _wide_videollama2(folder: Path) -> Path:
    from videollama2.checkpoint import copy_side_files, save_model
    from videollama2.config import VideoLLaMA2Config
    from videollama2.model import VideoLLaMA2ForCausalLM

    raw = json.loads((AV / "config.json").read_text())
    raw.update(hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=4,
               hidden_size_a=1024)
    torch.manual_seed(0)
    model = VideoLLaMA2ForCausalLM(VideoLLaMA2Config(raw, "wide"))
    save_model(model.eval(), folder, max_shard_bytes=100 * 2 ** 20)
    copy_side_files(AV, folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llava", "videollama2"])
def test_peak_resident_memory_is_lower_with_blocks_on_disk(tmp_path, model):
    """Two CLI processes on a model whose decoder blocks are 63 MB each: the offloaded run's peak
    resident set size (ru_maxrss, in its report) is lower by more than one block."""
    module, data = ("llava.pruners", []) if model == "llava" else (
        "videollama2.pruners", ["--data_path", str(av_embedded.DATA_PATH), "--data_folder", str(av_embedded.MEDIA_FOLDER)])
    wide = (_wide_llava if model == "llava" else _wide_videollama2)(tmp_path / "wide")
    base = [sys.executable, "-m", module, "--model_path", str(wide), *data, *FAST, "--max_shard_size", "20MB"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, extra in (("plain", []), ("placed", ["--max_memory", "cpu:200MiB", "--offload_folder",
                                                   str(tmp_path / "off")])):
        done = subprocess.run(base + extra + ["--save_model", str(tmp_path / name)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = report_of(tmp_path / name)["placement"]
    block = runs["placed"]["plan"]["block_bytes"]
    assert runs["placed"]["blocks_per_device"].get("disk", 0) >= 2
    rss = {name: r["peak_memory"]["cpu"]["max_rss_bytes"] for name, r in runs.items()}
    assert rss["placed"] < rss["plain"] - block, rss
    weights = {name: r["peak_memory"]["cpu"]["weights_peak_bytes"] for name, r in runs.items()}
    assert weights["placed"] < weights["plain"] - block, weights
    expected, got = load_tensors(tmp_path / "plain"), load_tensors(tmp_path / "placed")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
