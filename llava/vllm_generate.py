"""Greedy answers of vLLM on a LLaVA-NeXT checkpoint, scored as `python -m llava.eval` scores them.

    python -m llava.vllm_generate --model_path DIR [--data_path JSON --image_folder DIR] [--limit N]
                                  [--predictions FILE] [--dtype float32]

Runs in the vLLM venv (scripts/eval/vllm_generate.sh sets it up). Each record's prompt is the token ids
llava.eval puts before the answer (llava.data: the chat template and one BOS, with one `<image>`
token that vLLM expands from the image), its image the same PIL image; vLLM's offline `LLM` answers
all prompts greedily with at most 8 new tokens, stopping at llava.eval's stop tokens, and the answer
tokens are decoded and scored as llava.eval decodes and scores them (exact match after
mmprune.evaluate.scoring.normalize_answer). Without --data_path: the embedded held-out split.

Prints one JSON line: n, accuracy, per_kind, vLLM's version, the model's dtype and the seconds spent
loading and generating; --predictions FILE also writes one JSON line per record (id, kind,
prediction, answer, correct), as llava.eval's predictions list holds them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

MAX_NEW_TOKENS = 8  # llava.eval's DEFAULT_MAX_NEW_TOKENS
# vLLM's CPU backend reserves this many GiB for its KV cache (its default is far more than the
# embedded models need); set before vLLM reads it
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # stdout ends with the one JSON line


def parse_args(argv=None) -> argparse.Namespace:
    from mmprune.base.entry import OneLineErrorParser

    parser = OneLineErrorParser(prog="python -m llava.vllm_generate",
                                description="vLLM's greedy answers on a LLaVA-NeXT checkpoint, scored as llava.eval.")
    parser.add_argument("--model_path", type=Path, required=True, help="llava-hf LLaVA-NeXT checkpoint directory")
    parser.add_argument("--data_path", type=Path, default=None,
                        help="LLaVA-NeXT raw-format JSON (default: the embedded held-out split)")
    parser.add_argument("--image_folder", type=Path, default=None,
                        help="folder the records' image paths are relative to (default: the data file's folder)")
    parser.add_argument("--limit", type=int, default=None, help="the first N records only")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="vLLM's compute dtype (default float32, as llava.eval runs on the CPU)")
    parser.add_argument("--max_model_len", type=int, default=None,
                        help="longest prompt plus answer in tokens (default: the decoder's context length); on "
                             "the CPU, vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE GiB, 1 by default here) must hold it")
    parser.add_argument("--predictions", type=Path, default=None, help="write one JSON line per record here")
    return parser.parse_args(argv)


def prompts(processor, records: list, image_folder) -> list:
    """vLLM prompts: llava.eval's prompt token ids (image unexpanded) and the record's image."""
    from llava.data import _render, _token_ids, build_messages, load_image, record_image

    out = []
    for record in records:
        text = _render(processor, build_messages(record, with_answer=False), add_generation_prompt=True)
        prompt = {"prompt_token_ids": _token_ids(processor.tokenizer, text)}
        relpath = record_image(record)
        if relpath is not None:
            prompt["multi_modal_data"] = {"image": load_image(image_folder, relpath)}
        out.append(prompt)
    return out


def score(records: list, answers: list) -> tuple:
    """(summary, predictions): exact-match accuracy overall and per kind, as llava.eval counts it."""
    from llava.data import reference_answer
    from mmprune.evaluate.scoring import normalize_answer

    predictions, totals = [], {}
    for record, answer in zip(records, answers):
        reference = reference_answer(record)
        correct = normalize_answer(answer) == normalize_answer(reference)
        predictions.append({"id": record.get("id"), "kind": record.get("kind"), "prediction": answer,
                            "answer": reference, "correct": correct})
        for key in {None, record.get("kind")}:
            hits, n = totals.get(key, (0, 0))
            totals[key] = (hits + int(correct), n + 1)
    hits, n = totals.get(None, (0, 0))
    per_kind = {str(k): {"n": v[1], "accuracy": v[0] / v[1]} for k, v in sorted(totals.items(), key=lambda kv: str(kv[0]))
                if k is not None}
    return {"n": n, "accuracy": hits / n if n else None, "per_kind": per_kind}, predictions


def run(argv=None) -> dict:
    args = parse_args(argv)
    from mmprune.base.errors import UserInputError

    if not (args.model_path / "config.json").is_file():
        raise UserInputError(f"{args.model_path} is not a llava-hf checkpoint directory (no config.json)")
    if args.limit is not None and args.limit < 1:
        raise UserInputError(f"--limit must be at least 1, got {args.limit}")
    from transformers import AutoProcessor

    from llava.data import load_records
    from llava.embedded import paths
    from llava.eval import stop_token_ids

    data_path = args.data_path or paths.EVAL_DATA_PATH
    image_folder = args.image_folder or (paths.EVAL_IMAGE_FOLDER if args.data_path is None else data_path.parent)
    records = load_records(data_path)[:args.limit]
    processor = AutoProcessor.from_pretrained(args.model_path)
    batch = prompts(processor, records, image_folder)

    import vllm

    start = time.monotonic()
    # eager mode: no graph capture to pay for on the CPU; one image per prompt, as the records hold
    length = {"max_model_len": args.max_model_len} if args.max_model_len else {}
    llm = vllm.LLM(model=str(args.model_path), dtype=args.dtype, enforce_eager=True,
                   limit_mm_per_prompt={"image": 1}, seed=0, **length)
    loaded = time.monotonic()
    sampling = vllm.SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS,
                                   stop_token_ids=stop_token_ids(processor.tokenizer))
    outputs = llm.generate(batch, sampling, use_tqdm=False)
    generated = time.monotonic()
    del llm  # the engine processes end (and log) now, before the summary line is printed
    import gc

    gc.collect()
    # decoded as llava.eval decodes its greedy tokens
    answers = [processor.tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=True) for o in outputs]
    summary, predictions = score(records, answers)
    if args.predictions is not None:
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        with open(args.predictions, "w", encoding="utf-8") as f:
            for row in predictions:
                f.write(json.dumps(row) + "\n")
    return {"model_path": str(args.model_path), "evaluator": f"vllm {vllm.__version__}", "dtype": args.dtype,
            **summary, "seconds": {"load": round(loaded - start, 1), "generate": round(generated - loaded, 1)}}


def main(argv=None) -> int:
    from mmprune.base.entry import run_main

    def job(argv):
        print(json.dumps(run(argv)))
        return 0

    return run_main(job, argv)


if __name__ == "__main__":  # vLLM starts its engine in other processes: only the main one runs this
    sys.exit(main())
