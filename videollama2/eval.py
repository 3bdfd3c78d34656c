"""Evaluate a VideoLLaMA2-AV checkpoint on AVInstruct-format question answering.

    python -m videollama2.eval --model_path DIR [--data_path JSON --data_folder DIR]
                               [--max_samples N] [--max_new_tokens K] [--device cpu|cuda]
                               [--realtext_tokens N]

Metrics: exact-match accuracy of the greedy answer (case, whitespace and trailing punctuation
normalised) and answer perplexity (teacher forced on the reference answer and its end-of-turn
tokens, token-weighted over the data set), overall and per question `kind` when records carry
one. Beside them, `realtext`: the Qwen2 decoder's perplexity (text only) on --realtext_tokens
(default 4096, 0 skips it) tokens of English text from the Python standard library, with the
source, token count and sha256 of the text (mmprune/evaluate/realtext.py). Prints one JSON line on stdout.
Without --data_path the embedded eval split of the model's task is used (the tiny model's basic
task, else the hard one; a banner on stderr says so).

`evaluate(model, tokenizer, records, data_folder, media)` is the same computation in-process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mmprune.run.cli import check_eval_limits
from mmprune.base.entry import OneLineErrorParser, run_main
from mmprune.run.checks import resolve_device
from mmprune.base.errors import UserInputError
from mmprune.evaluate.realtext import add_realtext_argument, realtext_perplexity
from mmprune.evaluate.scoring import (
    AnswerTally, cut_cache, greedy_answer, greedy_continue, last_answer_span, normalize_answer,
    teacher_forced_answer,
)
from videollama2.data import check_media, encode_record, load_records, reference_answer
from videollama2.embedded import paths
from videollama2.media import MediaLoader
from videollama2.model import IGNORE_INDEX

DEFAULT_MAX_NEW_TOKENS = 8


def stop_token_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>"):
        value = tokenizer.convert_tokens_to_ids(token)
        if isinstance(value, int) and value != tokenizer.unk_token_id:
            ids.add(value)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def score_record(model, full: dict, stop_ids: list[int], max_new_tokens: int) -> tuple[list[int], float, int]:
    """(greedy answer ids, answer NLL sum, answer token count). One teacher-forced pass gives the
    NLL and the argmax at every answer position (the head runs on the answer only); greedy
    decoding follows the reference while the argmax does, then goes on from the pass's KV cache
    cut back to where it left the reference (mmprune.evaluate.scoring.greedy_answer)."""
    span = last_answer_span(full["labels"])
    if span is None:
        raise UserInputError("a record has no answer tokens to score")
    start, end = span
    tail = full["input_ids"].shape[1] - start  # the answer is the text's tail, after every media token
    out = model(full["input_ids"], video=full.get("video"), audio=full.get("audio"), use_cache=True,
                logits_to_keep=tail + 1)
    targets = full["input_ids"][0, start:end]
    logits = out.logits[0, :end - start]
    nll, tokens = teacher_forced_answer(logits, targets, stop_ids, max_new_tokens)
    if tokens is not None:
        return tokens, nll, end - start
    cache = out.past_key_values
    answer_start = cache.get_seq_length() - tail  # in the spliced sequence (media tokens expanded)

    def step(token: int) -> torch.Tensor:
        ids = torch.tensor([[token]], device=model.device)
        return model(ids, past_key_values=cache, use_cache=True, last_logits_only=True).logits[0, -1]

    def continue_after(kept: int, token: int, budget: int) -> list[int]:
        cut_cache(cache, answer_start + kept)
        return greedy_continue(step, token, budget, stop_ids)

    return greedy_answer(logits, targets, stop_ids, max_new_tokens, continue_after), nll, end - start


def evaluate(model, tokenizer, records: list, data_folder, media: MediaLoader,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True, desc: str = "eval") -> dict:
    """{"n", "accuracy", "answer_perplexity", "per_kind": {kind: {same}}} of greedy answers."""
    if not records:
        raise UserInputError("no records to evaluate; check --data_path and --max_samples")
    model.eval()
    stop_ids = stop_token_ids(tokenizer)
    tally = AnswerTally()
    for record in tqdm(records, desc=desc, disable=not progress, file=sys.stderr):
        reference = reference_answer(record)
        if reference is None:
            raise UserInputError(f"record {record.get('id')!r} does not end with a gpt answer, so it cannot be scored")
        full = encode_record(tokenizer, record, data_folder, media, with_answer=True)
        if full["labels"][0, -1] == IGNORE_INDEX:
            raise UserInputError(f"record {record.get('id')!r}: the rendered conversation does not end with its answer")
        tokens, nll, count = score_record(model, full, stop_ids, max_new_tokens)
        prediction = tokenizer.decode(tokens, skip_special_tokens=True)
        tally.add(record.get("kind"), normalize_answer(prediction) == normalize_answer(reference), nll, count)
    return tally.result()


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="python -m videollama2.eval",
                                description="Greedy exact-match accuracy and answer perplexity of a VideoLLaMA2-AV "
                                            "checkpoint.")
    parser.add_argument("--model_path", required=True, help="checkpoint folder, e.g. the embedded "
                                                            "checkpoints/embedded/videollama2-av-tiny or a pruned one")
    parser.add_argument("--data_path", default=None, help="AVInstruct-format JSON (default: the embedded eval split)")
    parser.add_argument("--data_folder", default=None,
                        help="folder the records' media paths are relative to (default: the JSON's folder, or the "
                             "embedded media folder)")
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate the first N records only")
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="upstream", choices=["upstream", "auto", "float32", "bfloat16", "float16"],
                        help="upstream (default): float16 on a GPU, as VideoLLaMA2's own inference loads the model, "
                             "float32 on the CPU (upstream has no CPU path; float16 kernels there are slow); "
                             "auto: the checkpoint's torch_dtype")
    add_realtext_argument(parser)
    return parser.parse_args(argv)


def inference_dtype(choice: str, device) -> str:
    """The dtype name a --dtype choice loads the model in on `device`."""
    if choice != "upstream":
        return choice
    return "float16" if str(device).startswith("cuda") else "float32"


def run(argv=None) -> dict:
    from videollama2.adapter import load_videollama2

    args = parse_args(argv)
    check_eval_limits(args)
    if args.data_path is None:
        task = paths.embedded_data(args.model_path)
        sys.stderr.write(f"=== videollama2.eval: no --data_path, using the EMBEDDED {task.title} eval split "
                         f"{paths.shown(task.eval_data_path)} ===\n")
        data_path, folder = task.eval_data_path, Path(args.data_folder or task.media_folder)
    else:
        data_path = Path(args.data_path)
        folder = Path(args.data_folder) if args.data_folder else data_path.parent
    records = load_records(data_path)[: args.max_samples]
    device = resolve_device(args.device)
    model, tokenizer = load_videollama2(args.model_path, dtype=inference_dtype(args.dtype, device), device=device)
    media = MediaLoader.for_config(model.config, model.image_size)
    check_media(records, folder, media)
    result = evaluate(model, tokenizer, records, folder, media, args.max_new_tokens)
    if args.realtext_tokens:
        result["realtext"] = realtext_perplexity(model, tokenizer, args.realtext_tokens).as_dict()
    return {"model_path": str(args.model_path), "data_path": str(data_path), **result}


def main(argv=None) -> int:
    result = run(argv)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
