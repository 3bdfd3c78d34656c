"""lmms-lab (original LLaVA-NeXT) -> llava-hf conversion and loading, on tiny offline fixtures."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures_llava import (
    BASE_VOCAB,
    TINY_PINPOINTS_HW,
    TINY_VOCAB_SIZE,
    build_tiny_llava_next,
    build_tiny_lmms_lab,
    make_test_image,
)
from safetensors import safe_open
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from llava.convert import (
    LLAMA3_LLAVA_CHAT_TEMPLATE,
    PROVENANCE_FILE,
    convert_lmms_lab_to_hf,
    is_lmms_lab_checkpoint,
    load_llava_next,
    main,
)
from mmprune.base.errors import UserInputError

REPO_ROOT = Path(__file__).resolve().parents[1]
N_BASE = len(BASE_VOCAB)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image ?"}]}]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    hf = build_tiny_llava_next(root)
    lmms = build_tiny_lmms_lab(hf, root / "lmms-lab")
    converted = convert_lmms_lab_to_hf(lmms, root / "converted", max_shard_bytes=100_000)
    return {"root": root, "hf": hf, "lmms": lmms, "converted": converted}


def _load(path) -> LlavaNextForConditionalGeneration:
    return LlavaNextForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def _tree_digest(path: Path) -> dict:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_fixture_counts(dirs):
    processor = AutoProcessor.from_pretrained(dirs["hf"])
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(images=make_test_image(40, 56), text=text, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 5, 3, 28, 28)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == 14
    assert make_test_image(40, 56).size == (56, 40)


def test_detection(dirs, tmp_path):
    assert is_lmms_lab_checkpoint(dirs["lmms"])
    assert not is_lmms_lab_checkpoint(dirs["hf"])
    assert not is_lmms_lab_checkpoint(dirs["converted"])
    assert not is_lmms_lab_checkpoint(tmp_path)
    assert not is_lmms_lab_checkpoint(tmp_path / "missing")


def test_lmms_lab_copy_layout(dirs):
    cfg = json.loads((dirs["lmms"] / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["vocab_size"] == N_BASE
    index = json.loads((dirs["lmms"] / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.mm_projector.0.weight" in index and "model.image_newline" in index
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.encoder.layers.") for k in index)
    assert not any(k.startswith("language_model") for k in index)


def test_weights_equal(dirs):
    original = _load(dirs["hf"]).state_dict()
    model, info = LlavaNextForConditionalGeneration.from_pretrained(
        dirs["converted"], dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    converted = model.state_dict()
    assert set(converted) == set(original)
    grown = {"model.language_model.embed_tokens.weight", "lm_head.weight"}
    for name, tensor in original.items():
        if name in grown:
            assert converted[name].shape == (TINY_VOCAB_SIZE, tensor.shape[1])
            assert torch.equal(converted[name][:N_BASE], tensor[:N_BASE]), name
            mean = tensor[:N_BASE].mean(dim=0)
            for row in converted[name][N_BASE:]:
                assert torch.equal(row, mean), name
        else:
            assert torch.equal(converted[name], tensor), name


def test_sharded_output_and_provenance(dirs):
    out = dirs["converted"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert "image_newline" in index["weight_map"]
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in index["weight_map"]
    assert "multi_modal_projector.linear_2.bias" in index["weight_map"]
    assert not list(out.glob(".part-*")) and not list(out.parent.glob(".tmp-*"))
    prov = json.loads((out / PROVENANCE_FILE).read_text())
    assert prov["added_tokens"] == {"<image>": N_BASE, "<pad>": N_BASE + 1}
    assert prov["vocab_rows"] == {"source": N_BASE, "converted": TINY_VOCAB_SIZE}


def test_config_and_processor(dirs):
    cfg = json.loads((dirs["converted"] / "config.json").read_text())
    assert cfg["model_type"] == "llava_next"
    assert cfg["image_token_index"] == N_BASE
    assert cfg["vision_feature_layer"] == -2 and cfg["vision_feature_select_strategy"] == "default"
    assert cfg["text_config"]["vocab_size"] == TINY_VOCAB_SIZE
    assert cfg["text_config"]["pad_token_id"] == N_BASE + 1
    assert cfg["vision_config"]["hidden_size"] == 32 and cfg["vision_config"]["image_size"] == 28

    processor = AutoProcessor.from_pretrained(dirs["converted"])
    assert processor.patch_size == 14
    assert processor.num_additional_image_tokens == 1
    assert processor.vision_feature_select_strategy == "default"
    assert processor.chat_template == LLAMA3_LLAVA_CHAT_TEMPLATE
    ip = processor.image_processor
    assert ip.size["shortest_edge"] == 28
    assert (ip.crop_size["height"], ip.crop_size["width"]) == (28, 28)
    assert list(ip.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert list(ip.image_std) == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [N_BASE, N_BASE + 1]
    assert tok.pad_token == "<pad>"
    assert "<image>" in [str(t) for t in tok.all_special_tokens] or "<image>" in tok.get_added_vocab()
    # special tokens are never split, the expanded <image> run becomes one id per copy
    assert tok("<image><image>", add_special_tokens=False)["input_ids"] == [N_BASE, N_BASE]


def test_pinpoint_orientation(dirs):
    src_cfg = json.loads((dirs["lmms"] / "config.json").read_text())
    assert src_cfg["image_grid_pinpoints"] == [[w, h] for h, w in TINY_PINPOINTS_HW]
    cfg = json.loads((dirs["converted"] / "config.json").read_text())
    assert cfg["image_grid_pinpoints"] == TINY_PINPOINTS_HW
    processor = AutoProcessor.from_pretrained(dirs["converted"])
    assert [list(p) for p in processor.image_processor.image_grid_pinpoints] == TINY_PINPOINTS_HW


def test_pinpoint_orientation_asymmetric(dirs, tmp_path):
    # a single (width 56, height 28) pinpoint must become (height 28, width 56): a wide image is
    # cut into 1 row x 2 columns of tiles, i.e. base + 2 tiles
    src = tmp_path / "src"
    shutil.copytree(dirs["lmms"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["image_grid_pinpoints"] = [[56, 28]]
    (src / "config.json").write_text(json.dumps(cfg))
    out = convert_lmms_lab_to_hf(src, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["image_grid_pinpoints"] == [[28, 56]]
    processor = AutoProcessor.from_pretrained(out)
    inputs = processor(images=make_test_image(28, 56), text="<image> what", return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 3, 28, 28)
    # 4 base + 2x4 grid + 2 newlines
    assert int((inputs["input_ids"] == N_BASE).sum()) == 14
    model = _load(out)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_logits_match(dirs):
    ref_model, ref_proc = _load(dirs["hf"]), AutoProcessor.from_pretrained(dirs["hf"])
    model, proc = _load(dirs["converted"]), AutoProcessor.from_pretrained(dirs["converted"])
    text = proc.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert text == ref_proc.apply_chat_template(MESSAGES, add_generation_prompt=True)
    image = make_test_image(40, 56)
    ref_inputs = ref_proc(images=image, text=text, return_tensors="pt")
    inputs = proc(images=image, text=text, return_tensors="pt")
    assert set(inputs) == set(ref_inputs)
    for key in inputs:
        assert torch.equal(inputs[key], ref_inputs[key]), key
    with torch.no_grad():
        ref = ref_model(**ref_inputs).logits
        out = model(**inputs).logits
    assert out.shape == ref.shape == (1, inputs["input_ids"].shape[1], TINY_VOCAB_SIZE)
    # the grown lm_head rows (added tokens and padding) differ on purpose
    torch.testing.assert_close(out[..., :N_BASE], ref[..., :N_BASE], rtol=0, atol=1e-5)


def test_chat_template_text(dirs):
    processor = AutoProcessor.from_pretrained(dirs["converted"])
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": " You are a helpful assistant . "}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat ."}]},
    ]
    text = processor.apply_chat_template(conversation)
    assert text == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant .<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat is it ?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na cat .<|eot_id|>"
    )
    plain = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert plain.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_refuses_existing_dst_and_keeps_src(dirs, tmp_path):
    before = _tree_digest(dirs["lmms"])
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(UserInputError, match="already exists"):
        convert_lmms_lab_to_hf(dirs["lmms"], dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    with pytest.raises(UserInputError, match="already exists"):
        convert_lmms_lab_to_hf(dirs["lmms"], dirs["converted"])
    with pytest.raises(UserInputError, match="inside the source"):
        convert_lmms_lab_to_hf(dirs["lmms"], dirs["lmms"] / "sub")
    assert _tree_digest(dirs["lmms"]) == before
    assert not list(tmp_path.glob(".tmp-*"))


def test_convert_errors(dirs, tmp_path):
    with pytest.raises(UserInputError, match="not a directory"):
        convert_lmms_lab_to_hf(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(UserInputError, match="already in the llava-hf layout"):
        convert_lmms_lab_to_hf(dirs["hf"], tmp_path / "out")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserInputError, match="not an lmms-lab"):
        convert_lmms_lab_to_hf(other, tmp_path / "out")
    with pytest.raises(UserInputError, match="unknown dtype"):
        convert_lmms_lab_to_hf(dirs["lmms"], tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()


def test_unsupported_layouts(dirs, tmp_path):
    def variant(name, **changes):
        src = tmp_path / name
        shutil.copytree(dirs["lmms"], src)
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(changes)
        (src / "config.json").write_text(json.dumps(cfg))
        return src

    with pytest.raises(UserInputError, match="image_aspect_ratio"):
        convert_lmms_lab_to_hf(variant("pad", image_aspect_ratio="pad"), tmp_path / "o1")
    with pytest.raises(UserInputError, match="Llama-based"):
        convert_lmms_lab_to_hf(variant("qwen", model_type="llava_qwen", architectures=["X"]), tmp_path / "o2")
    with pytest.raises(UserInputError, match="image_grid_pinpoints"):
        convert_lmms_lab_to_hf(variant("pins", image_grid_pinpoints="(1x1),...,(6x6)"), tmp_path / "o3")
    # an unknown weight is reported, not dropped
    src = variant("extra")
    index_file = src / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    from safetensors.torch import save_file

    save_file({"model.vision_resampler.weight": torch.zeros(2)}, str(src / "extra.safetensors"))
    index["weight_map"]["model.vision_resampler.weight"] = "extra.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(UserInputError, match="model.vision_resampler.weight"):
        convert_lmms_lab_to_hf(src, tmp_path / "o4")
    assert not list(tmp_path.glob("o*"))


def test_vision_config_sources(dirs, tmp_path):
    hf = dirs["hf"]
    in_config = build_tiny_lmms_lab(hf, tmp_path / "in-config", vision_config_in="config", n_shards=1)
    out = convert_lmms_lab_to_hf(in_config, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vision_config"]["num_hidden_layers"] == 2
    # without a vision config the ViT-L/14-336 numbers are assumed and checked against the weights
    no_config = build_tiny_lmms_lab(hf, tmp_path / "no-config", vision_config_in="none", n_shards=1)
    with pytest.raises(UserInputError, match="ViT-L/14-336.*hidden_size 1024 vs 32"):
        convert_lmms_lab_to_hf(no_config, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_default_vision_numbers_used(dirs, tmp_path, monkeypatch):
    # the no-vision-config path builds the tower from CLIP_VIT_L_14_336; shrink it to the fixture
    import llava.convert.configs as configs

    tiny = dict(configs.CLIP_VIT_L_14_336, hidden_size=32, intermediate_size=64, projection_dim=32)
    tiny.update(num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
    monkeypatch.setattr(configs, "CLIP_VIT_L_14_336", tiny)
    src = build_tiny_lmms_lab(dirs["hf"], tmp_path / "no-config", vision_config_in="none", n_shards=1)
    out = convert_lmms_lab_to_hf(src, tmp_path / "out")
    vc = json.loads((out / "config.json").read_text())["vision_config"]
    assert (vc["hidden_act"], vc["layer_norm_eps"], vc["num_attention_heads"]) == ("quick_gelu", 1e-5, 2)
    original = _load(dirs["hf"]).state_dict()
    converted = _load(out).state_dict()
    for name in original:
        if name.startswith("model.vision_tower."):
            assert torch.equal(converted[name], original[name]), name


def test_dtype_cast(dirs, tmp_path):
    out = convert_lmms_lab_to_hf(dirs["lmms"], tmp_path / "bf16", dtype="bfloat16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model, _ = load_llava_next(out)
    assert model.dtype == torch.bfloat16
    original = _load(dirs["hf"]).state_dict()
    w = model.state_dict()["model.multi_modal_projector.linear_1.weight"]
    assert torch.equal(w, original["model.multi_modal_projector.linear_1.weight"].to(torch.bfloat16))


def test_load_llava_next_hf_dir(dirs):
    model, processor = load_llava_next(dirs["hf"], dtype="float32")
    assert isinstance(model, LlavaNextForConditionalGeneration) and not model.training
    assert processor.num_additional_image_tokens == 1


def test_load_llava_next_converts(dirs, tmp_path, capsys):
    model, processor = load_llava_next(dirs["lmms"], dtype=torch.float32)
    err = capsys.readouterr().err
    assert "lmms-lab" in err and "converting" in err
    assert model.config.image_token_id == N_BASE
    ref = _load(dirs["hf"])
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(images=make_test_image(56, 40), text=text, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs).logits[..., :N_BASE], ref(**inputs).logits[..., :N_BASE], rtol=0, atol=1e-5
        )

    cache = tmp_path / "cache"
    load_llava_next(dirs["lmms"], dtype=torch.float32, convert_cache_dir=cache)
    assert "converting" in capsys.readouterr().err
    (converted,) = list(cache.iterdir())
    assert (converted / PROVENANCE_FILE).is_file()
    load_llava_next(dirs["lmms"], dtype=torch.float32, convert_cache_dir=cache)
    assert "using the llava-hf conversion" in capsys.readouterr().err
    assert len(list(cache.iterdir())) == 1
    # a cache entry that is not a conversion of this source is not used
    (converted / PROVENANCE_FILE).write_text("{}")
    with pytest.raises(UserInputError, match="not a conversion of the current"):
        load_llava_next(dirs["lmms"], convert_cache_dir=cache)


def test_load_llava_next_errors(dirs, tmp_path):
    with pytest.raises(UserInputError, match=r"does not exist.*python -m llava\.convert"):
        load_llava_next(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match=r"no readable config\.json.*llava_next"):
        load_llava_next(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserInputError, match=r"model_type 'llama'.*python -m llava\.convert"):
        load_llava_next(other)
    with pytest.raises(UserInputError, match="unknown dtype"):
        load_llava_next(dirs["hf"], dtype="float8")


def test_cli(dirs, tmp_path, capsys):
    dst = tmp_path / "cli-out"
    assert main(["--src", str(dirs["lmms"]), "--dst", str(dst), "--dtype", "float32"]) == 0
    assert (dst / "config.json").is_file()
    capsys.readouterr()
    assert main(["--src", str(dirs["lmms"]), "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already exists" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main(["--src", str(dirs["lmms"])])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_cli_subprocess_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llava.convert", "--src", str(tmp_path / "nope"), "--dst", str(tmp_path / "o")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]
