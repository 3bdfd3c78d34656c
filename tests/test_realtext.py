"""Real-text perplexity (mmprune/evaluate/realtext.py): the exact value against a slow per-window recomputation,
the corpus (deterministic, large enough), and the evaluation CLIs that print it."""

import hashlib
import json
import math
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fixtures_videollama2 import build_tiny_model
from llava import eval as llava_eval
from llava.embedded import paths
from mmprune.evaluate import realtext
from videollama2 import eval as videollama2_eval
from videollama2.embedded import paths as vl2_paths


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(paths.CHECKPOINT_DIR)


def tiny_llama(tokenizer, max_positions: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    return LlamaForCausalLM(config).eval()


def slow_perplexity(model, tokenizer, max_tokens: int, window: int, prefix) -> float:
    """The obvious computation: each window through the whole model, one cross-entropy term per position."""
    ids = tokenizer(realtext.corpus().text, add_special_tokens=False)["input_ids"][:max_tokens]
    nll, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ([prefix] if prefix is not None else []) + ids[start:start + window]
        with torch.no_grad():
            logits = model(torch.tensor([chunk])).logits[0].double()
        for position in range(len(chunk) - 1):
            nll += float(-torch.log_softmax(logits[position], dim=-1)[chunk[position + 1]])
            count += 1
    return math.exp(nll / count)


def test_exact_perplexity_equals_slow_recomputation(tiny_tokenizer):
    model = tiny_llama(tiny_tokenizer, max_positions=128)  # caps the asked window of 200
    result = realtext.realtext_perplexity(model, tiny_tokenizer, max_tokens=700, window=200)
    assert result.window == 127 and result.windows == 6 and result.tokens == 700
    expected = slow_perplexity(model, tiny_tokenizer, 700, 127, tiny_tokenizer.bos_token_id)
    assert result.perplexity == pytest.approx(expected, rel=1e-6)
    assert result.mean_nll == pytest.approx(math.log(expected), rel=1e-6)
    assert result.prefix_token == "<|begin_of_text|>"


class WithoutBosEos:
    """A tokenizer that has neither BOS nor EOS."""

    bos_token_id = eos_token_id = None

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_without_bos_or_eos_the_first_token_is_context(tiny_tokenizer):
    model = tiny_llama(tiny_tokenizer, max_positions=512)
    result = realtext.realtext_perplexity(model, WithoutBosEos(tiny_tokenizer), max_tokens=301, window=100)
    assert result.prefix_token is None and result.windows == 3 and result.tokens == 301 - 4  # last chunk: 1 token
    assert result.perplexity == pytest.approx(slow_perplexity(model, tiny_tokenizer, 301, 100, None), rel=1e-6)


def test_llava_next_and_videollama2_decoders(embedded_llava):
    """Text-only through the language model inside each multimodal model equals its full text-only forward."""
    model, processor = embedded_llava
    result = realtext.realtext_perplexity(model, processor.tokenizer, max_tokens=600, window=300)
    assert result.perplexity == pytest.approx(
        slow_perplexity(model, processor.tokenizer, 600, 300, processor.tokenizer.bos_token_id), rel=1e-6)
    vl2, tokenizer = build_tiny_model()
    result = realtext.realtext_perplexity(vl2, tokenizer, max_tokens=600, window=300)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    assert result.perplexity == pytest.approx(slow_perplexity(vl2, tokenizer, 600, 300, prefix), rel=1e-6)


def test_corpus_is_deterministic_and_large_enough(tiny_tokenizer):
    first = realtext.corpus()
    realtext.corpus.cache_clear()
    second = realtext.corpus()
    assert first is not second and first == second
    assert second.sha256 == hashlib.sha256(second.text.encode("utf-8")).hexdigest()
    if (3, 10) <= sys.version_info[:2] <= (3, 13):  # the versions the text was checked on
        assert second.sha256 == realtext.REFERENCE_SHA256 and len(second.text) == 58664
    ids = tiny_tokenizer(second.text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= realtext.DEFAULT_TOKENS
    assert "Zen of Python" in second.text and ">>>" not in second.text


def test_default_run_on_the_embedded_model(embedded_llava):
    model, processor = embedded_llava
    result = realtext.realtext_perplexity(model, processor.tokenizer).as_dict()
    assert result["tokens"] == realtext.DEFAULT_TOKENS and result["corpus_tokens"] >= realtext.DEFAULT_TOKENS
    assert result["windows"] == math.ceil(realtext.DEFAULT_TOKENS / result["window"])
    assert result["perplexity"] > 1 and result["sha256"] == realtext.corpus().sha256
    assert "standard library" in result["source"] and "error" not in result


def test_llava_eval_cli_prints_it(capsys):
    code = llava_eval.main(["--model_path", str(paths.CHECKPOINT_DIR), "--max_samples", "2",
                            "--realtext_tokens", "1000"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"accuracy", "answer_perplexity", "realtext"} <= set(result)
    assert result["realtext"]["tokens"] == 1000 and result["realtext"]["perplexity"] > 1
    assert llava_eval.main(["--model_path", str(paths.CHECKPOINT_DIR), "--max_samples", "2",
                            "--realtext_tokens", "0"]) == 0
    assert "realtext" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_videollama2_eval_cli_prints_it(capsys):
    code = videollama2_eval.run_main(videollama2_eval.main, ["--model_path", str(vl2_paths.CHECKPOINT_DIR),
                                                              "--max_samples", "2", "--realtext_tokens", "700"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["realtext"]["tokens"] == 700 and result["realtext"]["sha256"] == realtext.corpus().sha256


@pytest.mark.parametrize("value", ["-1", "many"])
def test_bad_token_budget_is_one_error_line(capsys, value):
    with pytest.raises(SystemExit) as exc:
        videollama2_eval.main(["--model_path", str(vl2_paths.CHECKPOINT_DIR), "--realtext_tokens", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--realtext_tokens" in err[-1]


def test_eas_model_is_not_measured(tiny_tokenizer):
    from transformers import LlavaNextForConditionalGeneration

    from llava.eas import install

    model = LlavaNextForConditionalGeneration.from_pretrained(paths.CHECKPOINT_DIR, dtype=torch.float32).eval()
    install(model, [1], rank=4)
    result = realtext.realtext_perplexity(model, tiny_tokenizer, max_tokens=300)
    assert result.perplexity is None and "EAS" in result.error and result.tokens == 300
