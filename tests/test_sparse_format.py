"""--save_format compressed: the decoder linears in compressed-tensors' sparse formats, read back to the
very weights of the dense save.

The tiny embedded LLaVA-NeXT is pruned twice with TAMP 50% (unstructured and 2:4), saved dense and compressed; the
compressed checkpoint's dense copy (mmprune.base.sparse_format.write_dense_copy, the compressed-tensors
library's decompression) must have the dense save's weight file and config.json byte for byte, the
project's loaders must give the same tensors, and the decoder linears must take at most 0.6x their
dense bytes at 50% unstructured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llava.embedded import layout
from mmprune.base import sparse_format
from mmprune.base.entry import run_main
from mmprune.base.errors import UserInputError

pytest.importorskip("compressed_tensors", reason="the `sparse` extra (make setup installs it)")

DECODER_LINEARS = 4 * 7  # the tiny model: 4 decoder layers of 7 linears


def prune(out: Path, save_format: str, pattern: str = "unstructured", extra=()) -> dict:
    from llava.pruners.__main__ import main

    argv = ["--method", "tamp", "--llm_sparsity_ratio", "0.5", "--sparsity_type", pattern, "--nsamples", "8",
            "--no_eval", "--realtext_tokens", "0", "--model_path", str(layout.CHECKPOINT_DIR),
            "--save_model", str(out), "--save_format", save_format, "--device", "cpu", *extra]
    assert main(argv) == 0
    return json.loads((out / "pruning_report.json").read_text())


def tensors(folder: Path) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(scope="module")
def saves(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    return {(fmt, pattern): (root / f"{fmt}-{pattern.replace(':', '_')}",
                             prune(root / f"{fmt}-{pattern.replace(':', '_')}", fmt, pattern))
            for fmt in ("dense", "compressed") for pattern in ("unstructured", "2:4")}


@pytest.mark.parametrize("pattern,fmt", [("unstructured", "sparse-bitmask"), ("2:4", "sparse-24-bitmask")])
def test_the_dense_copy_is_the_dense_save_byte_for_byte(saves, tmp_path, pattern, fmt):
    dense, _ = saves[("dense", pattern)]
    compressed, report = saves[("compressed", pattern)]
    assert sparse_format.compression_of(compressed) == fmt and sparse_format.compression_of(dense) is None
    stored = tensors(compressed)
    assert sum(k.endswith(".bitmask") for k in stored) == DECODER_LINEARS
    assert not any(k.endswith(".weight") and ".layers." in k and "language_model" in k and "proj" in k for k in stored)

    copy = sparse_format.write_dense_copy(compressed, tmp_path / "copy")
    for name in ("model.safetensors", "config.json"):
        assert (copy / name).read_bytes() == (dense / name).read_bytes(), name
    # and the config says what a loader needs: the format, its structure, the compressed modules
    block = json.loads((compressed / "config.json").read_text())["quantization_config"]
    assert block["quant_method"] == "compressed-tensors"
    sparsity = block["sparsity_config"]
    assert sparsity["format"] == fmt and sparsity["sparsity_structure"] == ("2:4" if pattern == "2:4" else "unstructured")
    assert len(sparsity["targets"]) == DECODER_LINEARS
    assert all(t.startswith("language_model.model.layers.") for t in sparsity["targets"])
    assert sparsity["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["checkpoint"]["compression"]["left_dense"] == []


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_the_project_loaders_read_the_same_weights(saves, pattern):
    from llava.convert import load_llava_next, load_model

    dense, _ = saves[("dense", pattern)]
    compressed, _ = saves[("compressed", pattern)]
    expected = load_model(dense, "cpu")[0].state_dict()
    for loader in (lambda p: load_model(p, "cpu")[0], lambda p: load_llava_next(p, dtype=torch.float32)[0]):
        got = loader(compressed).state_dict()
        assert got.keys() == expected.keys()
        assert all(same_bits(got[k], expected[k]) for k in expected)


def test_decoder_linears_take_at_most_six_tenths_at_half_sparsity(saves):
    dense, dense_report = saves[("dense", "unstructured")]
    compressed, report = saves[("compressed", "unstructured")]
    linears = report["checkpoint"]["compression"]["tensor_bytes"]
    assert linears["compressed"] <= 0.6 * linears["dense"]
    # the report's bytes are the files' bytes; the dense save's tensors are what the compressed one started from
    for folder, rep in ((dense, dense_report), (compressed, report)):
        assert rep["checkpoint"]["weight_file_bytes"] == (folder / "model.safetensors").stat().st_size
    assert report["checkpoint"]["tensor_bytes"]["dense"] == dense_report["checkpoint"]["tensor_bytes"]["written"]
    saved = dense_report["checkpoint"]["weight_file_bytes"] - report["checkpoint"]["weight_file_bytes"]
    # the files shrink by what the decoder linears lose (plus a longer safetensors header)
    assert abs(saved - (linears["dense"] - linears["compressed"])) < 16_384


def test_a_placed_sharded_compressed_save(tmp_path):
    """Offloaded decoder blocks, several shards: each module's compressed tensors in one file, index included."""
    dense = tmp_path / "dense"
    prune(dense, "dense", extra=["--max_shard_size", "400KB"])
    compressed = tmp_path / "compressed"
    report = prune(compressed, "compressed", extra=["--max_shard_size", "400KB", "--max_memory", "cpu:6MiB",
                                                    "--offload_folder", str(tmp_path / "off")])
    assert report["placement"]["blocks_per_device"].get("disk", 0) >= 2
    assert len(list(compressed.glob("*.safetensors"))) > 1
    index = json.loads((compressed / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(tensors(compressed))
    copy = sparse_format.write_dense_copy(compressed, tmp_path / "copy")
    expected, got = tensors(dense), tensors(copy)
    assert expected.keys() == got.keys() and all(same_bits(got[k], expected[k]) for k in expected)


def test_weights_the_format_cannot_give_back_stay_dense():
    """Hand-made 2x8 weights: a 2:4 one, one with three nonzeros in a group of four, one holding -0.0."""
    two_four = torch.tensor([[1., 0., 2., 0., 0., 3., 0., 4.], [0., 0., 5., 6., 7., 0., 0., 8.]])
    three = two_four.clone()
    three[0, 1] = 9.0
    signed = two_four.clone()
    signed[1, 0] = -0.0
    shard = {"a.weight": two_four, "b.weight": three, "c.weight": signed, "d.bias": torch.ones(2)}
    writer = sparse_format.SparseWriter(sparse_format.BITMASK_24, {"a.weight", "b.weight", "c.weight"})
    out = writer(dict(shard))
    assert {"a.compressed", "a.bitmask", "a.shape"} <= set(out) and "a.weight" not in out
    assert same_bits(out["b.weight"], three) and same_bits(out["c.weight"], signed) and "d.bias" in out
    assert writer.compressed == ["a"] and sorted(writer.left_dense) == ["b", "c"]
    assert out["a.compressed"].tolist() == [[1., 2., 3., 4.], [5., 6., 7., 8.]]  # the kept half, row by row
    from compressed_tensors.compressors import BaseCompressor

    dense = dict(BaseCompressor.load_from_registry(sparse_format.BITMASK_24, config=writer.config)
                 .decompress_from_state_dict(out))
    assert same_bits(dense["a.weight"], two_four)
    # the bitmask format takes any zeros, not a -0.0
    bitmask = sparse_format.SparseWriter(sparse_format.BITMASK, {"b.weight", "c.weight"})
    out = bitmask(dict(shard))
    assert bitmask.compressed == ["b"] and bitmask.left_dense == ["c"] and out["b.compressed"].numel() == 9


def test_videollama2_refuses_the_compressed_format(tmp_path, capsys):
    from videollama2.pruners.__main__ import main

    out = tmp_path / "av"
    assert run_main(main, ["--method", "wanda", "--save_model", str(out), "--save_format", "compressed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --save_format compressed is for LLaVA-NeXT") and len(err) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_without_the_library_compressed_is_one_error_line(tmp_path, capsys, monkeypatch):
    import sys

    from llava.pruners.__main__ import main

    monkeypatch.setitem(sys.modules, "compressed_tensors", None)  # as if not installed
    out = tmp_path / "out"
    assert run_main(main, ["--method", "wanda", "--model_path", str(layout.CHECKPOINT_DIR), "--save_model", str(out),
                           "--save_format", "compressed"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: compressed checkpoints need compressed-tensors 0.13")
    assert not out.exists()


def test_dense_copy_cli(saves, tmp_path, capsys):
    compressed, _ = saves[("compressed", "unstructured")]
    dense, _ = saves[("dense", "unstructured")]
    assert sparse_format.main(["dense-copy", str(compressed), str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == (dense / "model.safetensors").read_bytes()
    assert sparse_format.main(["dense-copy", str(dense), str(tmp_path / "again")]) == 2
    assert "is no compressed-tensors sparse checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()
    with pytest.raises(UserInputError):
        sparse_format.check_save_format("sparse")


def test_scripts_pass_save_format(tmp_path):
    """SAVE_FORMAT becomes --save_format in both trees' prune scripts (left out when unset: dense)."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    stub.chmod(0o755)
    for script in ("scripts/prune/tamp.sh", "scripts_videollama2/prune/tamp.sh"):
        for value in ("compressed", None):
            env = {**os.environ, "PYTHON": str(stub)}
            env.pop("SAVE_FORMAT", None)
            if value:
                env["SAVE_FORMAT"] = value
            args = subprocess.run(["bash", str(root / script), "0.5", "2:4"], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, check=True).stdout.splitlines()
            pairs = list(zip(args, args[1:]))
            assert (("--save_format", "compressed") in pairs) == bool(value) and ("--sparsity_type", "2:4") in pairs


def test_eval_scripts_get_the_dense_copy(saves, tmp_path):
    """scripts/lib/dense_copy.sh (lmms_eval.sh, vllm_generate.sh): a compressed checkpoint becomes its
    dense copy in a temporary folder, a dense one is used as it is."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    compressed, _ = saves[("compressed", "unstructured")]
    dense, _ = saves[("dense", "unstructured")]
    for model, expect_copy in ((compressed, True), (dense, False)):
        done = subprocess.run(["bash", "-c", 'source scripts/lib/dense_copy.sh; dense_model_dir "$1"; '
                               'echo "$DENSE_MODEL_DIR"; echo "$DENSE_TMP"', "-", str(model)], cwd=root,
                              env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, check=True)
        used, tmp = done.stdout.splitlines()
        assert (used != str(model)) == expect_copy and bool(tmp) == expect_copy
        assert (Path(used) / "model.safetensors").read_bytes() == (dense / "model.safetensors").read_bytes()
        if tmp:
            assert Path(used).parent == Path(tmp)
            subprocess.run(["rm", "-rf", tmp], check=True)
