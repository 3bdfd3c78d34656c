"""Evaluate a LLaVA-NeXT checkpoint on LLaVA-NeXT raw-format VQA data.

    python -m llava.eval --model_path DIR [--data_path JSON --image_folder DIR]
                         [--max_samples N] [--max_new_tokens K] [--token_recipe RECIPE.json]
                         [--realtext_tokens N]

Metrics: exact-match accuracy of the greedy answer (case, whitespace and trailing punctuation
normalised) and answer-token perplexity (teacher forced on the reference answer and its
end-of-turn token, token-weighted over the data set), overall and per question `kind` when
records carry one. Beside them, `realtext`: the language decoder's perplexity on --realtext_tokens
(default 4096, 0 skips it) tokens of English text from the Python standard library, with the
source, token count and sha256 of the text (mmprune/evaluate/realtext.py; text only, the token recipe does
not apply). Prints one JSON line on stdout. Without --data_path the embedded synthetic eval split
is used (a banner on stderr says so).

`evaluate(model, processor, records, image_folder)` is the same computation for in-process use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from llava.data import encode_record, load_records, model_inputs, reference_answer
from llava.embedded import paths
from mmprune.run.cli import check_eval_limits, set_cpu_threads  # noqa: F401  (set_cpu_threads re-exported)
from llava.convert.loading import load_model
from mmprune.base.errors import UserInputError
from mmprune.evaluate.realtext import add_realtext_argument, realtext_perplexity
from mmprune.evaluate.scoring import (  # noqa: F401
    AnswerTally, cut_cache, greedy_answer, greedy_continue, last_answer_span, normalize_answer,
    teacher_forced_answer,
)

DEFAULT_MAX_NEW_TOKENS = 8


def stop_token_ids(tokenizer) -> list:
    """EOS plus Llama-3's end-of-turn token when the tokenizer has it."""
    ids = [tokenizer.eos_token_id]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids.append(eot)
    return sorted({i for i in ids if i is not None})


def _input_device(model) -> torch.device:
    """Where the forward takes its inputs: a model accelerate placed takes them on its main device
    (its first parameter may be offloaded to the meta device)."""
    from mmprune.place.offload import is_dispatched, main_device

    return main_device(model) if is_dispatched(model) else model.device


def _on_device(inputs: dict, model) -> dict:
    """Move tensors to the model's device; pixel values also to its floating dtype."""
    moved = {}
    device = _input_device(model)
    for key, value in inputs.items():
        value = value.to(device)
        if key == "pixel_values":
            value = value.to(model.dtype)
        moved[key] = value
    return moved


@torch.no_grad()
def greedy_decode(model, prompt: dict, max_new_tokens: int, stop_ids: list) -> list:
    """Token ids chosen by plain greedy decoding (argmax, KV cache), ending at a stop token.

    Written out rather than model.generate(): no generation_config processors can change the
    argmax, and it avoids generate()'s per-call overhead on tiny models.
    """
    inputs = _on_device(model_inputs(prompt), model)
    mask = inputs["attention_mask"]
    out = model(**inputs, use_cache=True)
    tokens = []
    while True:
        next_id = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(int(next_id))
        if tokens[-1] in stop_ids or len(tokens) == max_new_tokens:
            return tokens
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        out = model(input_ids=next_id, attention_mask=mask, past_key_values=out.past_key_values,
                    use_cache=True)


def _slice_prompt(full: dict, end: int) -> dict:
    """The first `end` positions of an encoded conversation (image inputs kept whole)."""
    return {key: value[:, :end] if key in ("input_ids", "attention_mask") else value
            for key, value in model_inputs(full).items()}


def _prompt_then_answer_logits(model, full: dict, start: int, end: int) -> torch.Tensor:
    """Next-token logits at positions start-1 .. end-2: the prompt alone first (a token recipe
    picks its kept visual tokens from the prompt, as in generation), then the answer on the cache."""
    out = model(**_on_device(_slice_prompt(full, start), model), use_cache=True)
    logits = [out.logits[0, -1:]]
    if end - start > 1:
        answer = full["input_ids"][:, start:end - 1].to(_input_device(model))
        mask = torch.ones(1, end - 1, dtype=torch.long, device=answer.device)
        logits.append(model(input_ids=answer, attention_mask=mask, past_key_values=out.past_key_values,
                            use_cache=True).logits[0])
    return torch.cat(logits).float()


@torch.no_grad()
def score_record(model, full: dict, stop_ids: list, max_new_tokens: int, prompt_first: bool = False) -> tuple:
    """(greedy answer token ids, answer NLL sum, answer token count) for one encoded record.

    One teacher-forced pass over prompt + reference answer gives the NLL and, at every answer
    position, the argmax next token. Greedy decoding follows the reference while those argmaxes do
    (each step sees the same prefix), so that part is read off, and the rest is decoded on the pass's
    KV cache cut back to where it left the reference (mmprune.evaluate.scoring.greedy_answer). prompt_first
    (used with a token recipe) runs the prompt alone, then the answer on its KV cache, and decodes a
    wrong answer from the prompt again.
    """
    span = last_answer_span(full["labels"])
    if span is None:
        raise UserInputError("the record has no answer tokens to score")
    start, end = span
    targets = full["input_ids"][0, start:end]
    if prompt_first:  # a recipe's caches differ in length between layers: decode from the prompt again
        logits = _prompt_then_answer_logits(model, full, start, end)
        nll, tokens = teacher_forced_answer(logits, targets, stop_ids, max_new_tokens)
        if tokens is None:
            tokens = greedy_decode(model, _slice_prompt(full, start), max_new_tokens, stop_ids)
        return tokens, nll, end - start
    tail = full["input_ids"].shape[1] - start  # positions from the answer's start to the text's end
    out = model(**_on_device(model_inputs(full), model), use_cache=True, logits_to_keep=tail + 1)
    logits = out.logits[0, :end - start].float()  # the head ran on the answer's positions only
    nll, tokens = teacher_forced_answer(logits, targets, stop_ids, max_new_tokens)
    if tokens is None:
        tokens = greedy_answer(logits, targets, stop_ids, max_new_tokens,
                               _continue_on_cache(model, out.past_key_values, tail, stop_ids))
    return tokens, nll, end - start


def _continue_on_cache(model, cache, tail: int, stop_ids: list):
    """greedy_answer's continuation for a teacher-forced pass over the whole text, whose last `tail`
    positions are the answer and what follows it: cut the cache back to the prompt plus the reference
    tokens greedy decoding shared, then decode one token at a time."""
    answer_start = cache.get_seq_length() - tail

    def continue_after(kept: int, token: int, budget: int) -> list:
        cut_cache(cache, answer_start + kept)

        def step(next_id: int) -> torch.Tensor:
            ids = torch.tensor([[next_id]], device=_input_device(model))
            mask = torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long, device=ids.device)
            return model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits[0, -1]

        return greedy_continue(step, token, budget, stop_ids)

    return continue_after


def evaluate(model, processor, records: list, image_folder, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             progress: bool = True, desc: str = "eval", token_recipe=None, predictions: list | None = None) -> dict:
    """Greedy exact-match accuracy and answer perplexity of `model` on `records`.

    Each record must end with a gpt answer; its last human turn is the prompt. Returns
    {"n", "accuracy", "answer_perplexity", "per_kind": {kind: {same three}}}; per_kind is empty
    when no record carries a `kind`. Perplexity is token-weighted over all answer tokens (the
    answer and its end-of-turn token). The model is put in eval mode. token_recipe (a FitPrune
    recipe or its JSON path) drops visual tokens in every prefill (llava.fitprune.apply_token_recipe).
    predictions, a list, gets one {"id", "kind", "prediction", "answer", "correct"} per record.
    """
    if not records:
        raise UserInputError("no records to evaluate; check --data_path and --max_samples")
    model.eval()
    if token_recipe is not None:
        from llava.fitprune import apply_token_recipe

        with apply_token_recipe(model, token_recipe):
            return evaluate(model, processor, records, image_folder, max_new_tokens, progress, desc,
                            predictions=predictions)
    # EAS adapters pool over the prompt, so the answer must not be in the same pass either
    prompt_first = bool(getattr(model, "_mmprune_token_recipe", False) or hasattr(model, "eas_state"))
    tokenizer = processor.tokenizer
    stop_ids = stop_token_ids(tokenizer)
    tally = AnswerTally()
    for record in tqdm(records, desc=desc, disable=not progress, file=sys.stderr):
        reference = reference_answer(record)
        if reference is None:
            raise UserInputError(f"record {record.get('id')!r} does not end with a gpt answer, so it "
                                 "cannot be scored")
        full = encode_record(processor, record, image_folder, with_answer=True)
        tokens, nll, count = score_record(model, full, stop_ids, max_new_tokens, prompt_first)
        prediction = tokenizer.decode(tokens, skip_special_tokens=True)
        correct = normalize_answer(prediction) == normalize_answer(reference)
        tally.add(record.get("kind"), correct, nll, count)
        if predictions is not None:
            predictions.append({"id": record.get("id"), "kind": record.get("kind"), "prediction": prediction,
                                "answer": reference, "correct": correct})
    return tally.result()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llava.eval",
        description="Greedy exact-match accuracy and answer perplexity of a LLaVA-NeXT checkpoint.")
    parser.add_argument("--model_path", type=Path, required=True,
                        help="llava-hf LLaVA-NeXT checkpoint directory, e.g. the embedded "
                             "checkpoints/embedded/llava-next-smol (after `make setup`)")
    parser.add_argument("--data_path", type=Path, default=None,
                        help="LLaVA-NeXT raw-format JSON (default: the embedded synthetic eval split)")
    parser.add_argument("--image_folder", type=Path, default=None,
                        help="folder the records' image paths are relative to "
                             "(default: the data file's folder, or the embedded eval images)")
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate the first N records only")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="generation limit per answer (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for models under 100M parameters on CPU, "
                             "else torch's default)")
    parser.add_argument("--token_recipe", type=Path, default=None,
                        help="FitPrune recipe JSON (scripts/fitprune/search.sh): drop visual tokens in the "
                             "prefill as it says")
    add_realtext_argument(parser)
    return parser.parse_args(argv)


def resolve_data(args) -> tuple:
    """(data_path, image_folder), falling back to the embedded eval split with a banner."""
    if args.data_path is None:
        print(f"=== llava.eval: no --data_path, using the EMBEDDED synthetic eval split "
              f"{paths.EVAL_DATA_PATH} ===", file=sys.stderr)
        return paths.EVAL_DATA_PATH, args.image_folder or paths.EVAL_IMAGE_FOLDER
    return args.data_path, args.image_folder or args.data_path.parent


def run(argv=None) -> dict:
    args = parse_args(argv)
    check_eval_limits(args)
    data_path, image_folder = resolve_data(args)
    records = load_records(data_path)[:args.max_samples]
    recipe = None
    if args.token_recipe is not None:
        from mmprune.tokens.recipe import load_recipe

        recipe = load_recipe(args.token_recipe)  # a bad file fails before the model loads
    model, processor = load_model(args.model_path, args.device)
    set_cpu_threads(model, args.threads)
    result = evaluate(model, processor, records, image_folder, args.max_new_tokens, token_recipe=recipe)
    extra = {"token_recipe": str(args.token_recipe)} if recipe is not None else {}
    if args.realtext_tokens:
        result["realtext"] = realtext_perplexity(model, processor.tokenizer, args.realtext_tokens).as_dict()
    return {"model_path": str(args.model_path), **extra, **result}


def main(argv=None) -> int:
    try:
        result = run(argv)
    except UserInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
