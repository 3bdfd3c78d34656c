"""Greedy answers decoded on the teacher-forced pass's cut-back KV cache (mmprune.evaluate.scoring.greedy_answer)
equal plain greedy decoding with a full forward pass per token, in both models' evaluators (up to a
near-tie of the two highest logits, which the two computations may round either way)."""

import torch
from fixtures_videollama2 import build_tiny_model
from near_ties import greedy_agreement
from transformers import LlamaConfig, LlamaForCausalLM

from llava import eval as llava_eval
from mmprune.evaluate.scoring import greedy_answer
from videollama2 import eval as av_eval
from videollama2.data import encode_record, load_records
from videollama2.embedded import paths as av_paths
from videollama2.media import MediaLoader


# the cached and the full passes agree to 1e-5 (rtol and atol, asserted for the AV model below): two
# logits within twice that of each other may swap, anything further apart may not
def near_tie(logits: torch.Tensor) -> float:
    return 2e-5 * (1 + float(logits.abs().max()))


@torch.no_grad()
def slow_greedy(step_logits, prompt_ids: torch.Tensor, count: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with a full forward over the whole text for every token; the tokens and
    each step's logits."""
    ids, tokens, logits = prompt_ids, [], []
    for _ in range(count):
        logits.append(step_logits(ids))
        tokens.append(int(logits[-1].argmax()))
        ids = torch.cat([ids, torch.tensor([tokens[-1:]])], dim=1)
    return tokens, torch.stack(logits)


@torch.no_grad()
def test_llava_continuation_equals_full_passes():
    torch.manual_seed(0)  # random weights: the argmax depends on every context token
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    for seed in range(8):
        ids = torch.randint(0, 48, (1, 20), generator=torch.Generator().manual_seed(seed))
        start, end = 14, 18
        expected, logits = slow_greedy(lambda x: model(input_ids=x).logits[0, -1], ids[:, :start], 8)
        ids[0, start:start + seed % 3] = torch.tensor(expected[:seed % 3])  # follow greedy for 0-2 tokens
        tail = ids.shape[1] - start
        out = model(input_ids=ids, use_cache=True, logits_to_keep=tail + 1)
        continue_after = llava_eval._continue_on_cache(model, out.past_key_values, tail, [])
        got = greedy_answer(out.logits[0, :end - start], ids[0, start:end], [], 8, continue_after)
        greedy_agreement(got, expected, logits, near_tie(logits))


def test_videollama2_continuation_sees_the_same_context_as_full_passes(monkeypatch):
    """With video and audio spliced in (the cache is longer than the text), every decoding step's
    logits equal those of a full pass over the media and the text so far."""
    model, tokenizer = build_tiny_model(3)
    media = MediaLoader.for_config(model.config, model.image_size)
    steps = []
    forward = type(model).forward

    def recording(self, input_ids, *args, **kwargs):
        out = forward(self, input_ids, *args, **kwargs)
        if kwargs.get("past_key_values") is not None:
            steps.append(out.logits[0, -1])
        return out

    monkeypatch.setattr(type(model), "forward", recording)
    for record in load_records(av_paths.EVAL_DATA_PATH)[:3]:
        full = encode_record(tokenizer, record, av_paths.MEDIA_FOLDER, media, with_answer=True)
        start, end = av_eval.last_answer_span(full["labels"])

        def full_pass(ids):
            return forward(model, ids, video=full["video"], audio=full["audio"]).logits[0, -1]

        expected, logits = slow_greedy(full_pass, full["input_ids"][:, :start], 6)
        ids = full["input_ids"].clone()
        ids[0, start] = expected[0]  # greedy follows the reference for one token, then leaves it
        steps.clear()
        tokens, _, _ = av_eval.score_record(model, dict(full, input_ids=ids), [], 6)
        greedy_agreement(tokens, expected, logits, near_tie(logits))
        read_off = 6 - len(steps)  # tokens taken from the teacher-forced pass before decoding on
        assert read_off == 2 == end - start  # the reference's first token, then the first differing one
        with torch.no_grad():
            for i, step in enumerate(steps):  # the full pass over the context this step decoded from
                context = torch.cat([ids[:, :start], torch.tensor([tokens[:read_off + i]])], dim=1)
                torch.testing.assert_close(step, full_pass(context), rtol=1e-5, atol=1e-5)
