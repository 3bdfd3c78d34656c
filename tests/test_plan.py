"""Placement options and the memory planner (mmprune/place/placement.py, mmprune/place/plan.py)."""

import json
import subprocess
import sys

import pytest

from mmprune.base.errors import UserInputError
from mmprune.place.placement import check_offload_folder
from mmprune.place.options import parse_device_map, parse_max_memory
from mmprune.place.plan import make_plan
from script_runs import ROOT

GiB = 1024 ** 3
TINY = ROOT / "checkpoints" / "embedded" / "llava-next-tiny"


def test_max_memory_parsed_and_bad_entries_named():
    assert parse_max_memory("0:20GiB, cuda:1:1GiB,cpu:60GiB,disk:900GB") == {
        0: 20 * GiB, 1: GiB, "cpu": 60 * GiB, "disk": 9 * 10 ** 11}
    assert parse_max_memory(None) is None
    for text, needle in [("gpu0:1GiB", "unknown device 'gpu0'"), ("0:lots", "not a memory size"),
                         ("0:1GiB,0:2GiB", "twice"), ("cpu", "not DEVICE:SIZE"), ("0:0", "not a memory size")]:
        with pytest.raises(UserInputError, match=needle):
            parse_max_memory(text)


def test_device_map_modes_files_and_bad_files(tmp_path):
    assert parse_device_map("balanced") == "balanced"
    good = tmp_path / "map.json"
    good.write_text(json.dumps({"model.language_model.layers.0": "cuda:0", "lm_head": "disk"}))
    assert parse_device_map(str(good)) == {"model.language_model.layers.0": 0, "lm_head": "disk"}
    (tmp_path / "bad.json").write_text(json.dumps({"lm_head": "tpu"}))
    (tmp_path / "broken.json").write_text("{")
    for arg, needle in [(str(tmp_path / "bad.json"), "unknown device 'tpu'"), (str(tmp_path / "broken.json"),
                        "not valid JSON"), ("fastest", "neither auto, balanced, sequential nor a JSON file")]:
        with pytest.raises(UserInputError, match=needle):
            parse_device_map(arg)


def test_offload_folder_checks(tmp_path):
    check_offload_folder(str(tmp_path / "new" / "offload"), needed=True)
    check_offload_folder(None, needed=False)
    afile = tmp_path / "notes.txt"
    afile.write_text("x")
    with pytest.raises(UserInputError, match="pass --offload_folder"):
        check_offload_folder(None, needed=True)
    with pytest.raises(UserInputError, match="is a file"):
        check_offload_folder(str(afile), needed=True)
    with pytest.raises(UserInputError, match="lies below the file"):
        check_offload_folder(str(afile / "sub"), needed=True)


def test_plan_sends_blocks_to_disk_within_the_budget_and_accounts_every_weight():
    from accelerate.utils import compute_module_sizes

    from mmprune.place.plan import empty_model

    total = compute_module_sizes(empty_model(TINY)[0])[""]
    plan = make_plan(TINY, {"cpu": 4_000_000, "disk": 10 ** 9}, dtype="float32", nsamples=4, seqlen=64,
                     shard_bytes=500_000)
    assert sum(plan.weights.values()) == total
    assert plan.blocks_per_device.get("disk", 0) >= 2 and sum(plan.blocks_per_device.values()) == 4
    # the CPU keeps room for one streamed block and one shard besides its weights
    assert plan.peak["cpu"] >= plan.weights["cpu"] + plan.block_bytes
    roomy = make_plan(TINY, {"cpu": 10 ** 9}, dtype="float32", nsamples=4, seqlen=64)
    assert set(roomy.blocks_per_device) == {"cpu"} and not roomy.over_budget


def test_plan_refuses_a_device_map_naming_missing_modules(tmp_path):
    with pytest.raises(UserInputError, match="lacks: model.nothing_here"):
        make_plan(TINY, None, {"model.nothing_here": "cpu"})


def test_plan_cli_prints_the_table_and_one_line_errors():
    run = [sys.executable, "-m", "mmprune.place.plan", "--model_path", str(TINY)]
    ok = subprocess.run(run + ["--max_memory", "0:1GiB,cpu:1GiB", "--nsamples", "8", "--seqlen", "128"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "compute device cuda:0" in ok.stdout and "expected peak" in ok.stdout
    bad = subprocess.run(run + ["--max_memory", "npu:1GiB"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --max_memory")


def test_every_method_name_plans_its_pruners_statistics():
    """Each preset plans the memory of its weight pruner: the OBS presets SparseGPT's Hessians, the
    Wanda-score methods and magnitude the per-column norms; a pruner name plans as itself."""
    from mmprune.base.presets import PRESETS

    by_pruner = {p: make_plan(TINY, method=p).method_bytes for p in ("sparsegpt", "wanda", "magnitude")}
    assert by_pruner["sparsegpt"] > by_pruner["wanda"] == by_pruner["magnitude"]
    for method, (_, pruner, _) in PRESETS.items():
        assert make_plan(TINY, method=method).method_bytes == by_pruner[pruner], method
