"""The committed embedded checkpoint and llava/eval.py."""

import json

import pytest
import torch
from near_ties import greedy_agreement

from llava import data, eval as llava_eval
from llava.embedded import paths, tiny

pytestmark = pytest.mark.skipif(not (paths.CHECKPOINT_DIR / "config.json").is_file(),
                                reason="embedded checkpoint not trained")


def test_checkpoint_is_small_and_complete():
    files = {f.name: f.stat().st_size for f in paths.CHECKPOINT_DIR.iterdir() if f.is_file()}
    assert "model.safetensors" in files and "training_info.json" in files
    assert sum(files.values()) < 15 * 1024 * 1024
    info = json.loads((paths.CHECKPOINT_DIR / "training_info.json").read_text())
    assert info["minutes"] <= 30


def test_checkpoint_has_the_llava_next_architecture(embedded_llava):
    model, processor = embedded_llava
    config = model.config
    assert config.image_grid_pinpoints == tiny.IMAGE_GRID_PINPOINTS
    assert config.vision_feature_select_strategy == "default" and config.vision_feature_layer == -2
    assert config.vision_config.model_type == "clip_vision_model"
    assert config.vision_config.num_hidden_layers >= 3
    text = config.text_config
    assert text.num_key_value_heads < text.num_attention_heads  # GQA
    assert text.hidden_size % 8 == 0 and text.intermediate_size % 8 == 0
    assert config.image_token_id == processor.tokenizer.convert_tokens_to_ids(tiny.IMAGE)
    assert data.image_token_id(processor) == config.image_token_id
    assert processor.num_additional_image_tokens == 1 and processor.patch_size == tiny.PATCH
    assert model.model.image_newline.shape == (text.hidden_size,)


def test_processor_roundtrip_keeps_template(embedded_llava, embedded_eval_records):
    _, processor = embedded_llava
    fresh = tiny.build_processor()
    record = embedded_eval_records[0]
    a = data.encode_record(processor, record, paths.EVAL_IMAGE_FOLDER)
    b = data.encode_record(fresh, record, paths.EVAL_IMAGE_FOLDER)
    for key in ("input_ids", "labels", "modality_ids", "image_sizes"):
        assert torch.equal(a[key], b[key]), key
    assert torch.allclose(a["pixel_values"], b["pixel_values"])


def test_heldout_accuracy(embedded_llava, embedded_eval_records):
    """Reloaded, the model is well above chance (about 0.35 over the four kinds) and matches
    the held-out accuracy recorded at training time on the same first 40 records' scale."""
    model, processor = embedded_llava
    result = llava_eval.evaluate(model, processor, embedded_eval_records[:40], paths.EVAL_IMAGE_FOLDER, progress=False)
    assert result["n"] == 40
    assert result["accuracy"] >= 0.55
    assert result["answer_perplexity"] < 3.0
    assert set(result["per_kind"]) == {"color", "shape", "count", "position"}
    assert sum(k["n"] for k in result["per_kind"].values()) == 40
    info = json.loads((paths.CHECKPOINT_DIR / "training_info.json").read_text())
    assert abs(result["accuracy"] - info["heldout_eval"]["accuracy"]) < 0.2


def test_heldout_accuracy_target():
    info = json.loads((paths.CHECKPOINT_DIR / "training_info.json").read_text())
    assert info["heldout_eval"]["accuracy"] >= 0.9


@torch.no_grad()
def _logits_along(model, prompt: dict, tokens: list) -> torch.Tensor:
    """The next-token logits of each step of `tokens` after `prompt`, in one pass."""
    ids = torch.cat([prompt["input_ids"], torch.tensor([tokens[:-1]])], dim=1)
    logits = model(**dict(prompt, input_ids=ids, attention_mask=torch.ones_like(ids))).logits[0]
    return logits[prompt["input_ids"].shape[1] - 1:]


def _near_tie(logits: torch.Tensor) -> float:
    """Logits this close may swap between two computations of them (measured: they differ by
    4e-7 * (1 + max |logit|); the top two of these 12 records are at least 0.23 apart)."""
    return 1e-5 * (1 + float(logits.abs().max()))


def test_fast_path_equals_generate(embedded_llava, embedded_eval_records):
    """score_record's greedy answer is what model.generate() produces greedily (the three decode
    on different caches: equal up to a near-tie of the top two logits)."""
    model, processor = embedded_llava
    stop = llava_eval.stop_token_ids(processor.tokenizer)
    for record in embedded_eval_records[:12]:
        full = data.encode_record(processor, record, paths.EVAL_IMAGE_FOLDER)
        tokens, _, _ = llava_eval.score_record(model, full, stop, max_new_tokens=8)
        start, _ = llava_eval.last_answer_span(full["labels"])
        prompt = llava_eval._slice_prompt(full, start)
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, eos_token_id=stop,
                                   pad_token_id=processor.tokenizer.pad_token_id)[0, start:].tolist()
        logits = _logits_along(model, prompt, generated)
        greedy_agreement(tokens, generated, logits, _near_tie(logits))
        greedy_agreement(llava_eval.greedy_decode(model, prompt, 8, stop), generated, logits, _near_tie(logits))


def test_decoding_past_the_reference_on_the_cache_equals_greedy_from_the_prompt(embedded_llava,
                                                                              embedded_eval_records):
    """With no stop token the answers follow the reference (or leave it) and go on to the limit:
    the part decoded on the teacher-forced pass's cut-back cache must equal a fresh greedy decode
    from the prompt (which test_fast_path_equals_generate ties to model.generate())."""
    model, processor = embedded_llava
    for record in embedded_eval_records[:12]:
        full = data.encode_record(processor, record, paths.EVAL_IMAGE_FOLDER)
        tokens, _, _ = llava_eval.score_record(model, full, [], max_new_tokens=6)
        start, end = llava_eval.last_answer_span(full["labels"])
        assert len(tokens) == 6 > end - start
        prompt = llava_eval._slice_prompt(full, start)
        decoded = llava_eval.greedy_decode(model, prompt, 6, [])
        logits = _logits_along(model, prompt, decoded)
        greedy_agreement(tokens, decoded, logits, _near_tie(logits))


def test_normalize_answer():
    assert llava_eval.normalize_answer("  Red. ") == "red"
    assert llava_eval.normalize_answer("Top\n left!?") == "top left"


def test_cli_prints_one_json_line(capsys):
    code = llava_eval.main(["--model_path", str(paths.CHECKPOINT_DIR), "--max_samples", "6"])
    captured = capsys.readouterr()
    assert code == 0
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"model_path", "n", "accuracy", "answer_perplexity", "per_kind", "realtext"}
    assert result["n"] == 6
    assert result["realtext"]["tokens"] == 4096 and result["realtext"]["perplexity"] > 1
    assert "EMBEDDED" in captured.err


@pytest.mark.parametrize("argv, match", [
    (["--model_path", "/nonexistent/model"], "no config.json"),
    (["--model_path", str(paths.CHECKPOINT_DIR), "--data_path", "/nonexistent/data.json"], "does not exist"),
    (["--model_path", str(paths.CHECKPOINT_DIR), "--max_samples", "0"], "--max_samples"),
])
def test_cli_errors(capsys, argv, match):
    assert llava_eval.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and match in err[-1]


def test_committed_reports_show_repository_paths(tmp_path):
    assert paths.shown(paths.CHECKPOINT_DIR) == "checkpoints/embedded/llava-next-tiny"
    assert paths.shown(paths.EVAL_DATA_PATH) == "playground/embedded/LLaVA-NeXT-Data/eval/synthvqa_eval.json"
    assert paths.shown(tmp_path) == str(tmp_path)  # outside the repository: unchanged
