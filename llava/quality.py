"""`python -m llava.quality`: the quality table of the embedded LLaVA-NeXT (or any checkpoint).
Prunes with every method at every sparsity setting and calibration seed, evaluates each pruned
model (held-out accuracy, answer perplexity, real-text perplexity of the decoder), and writes a
section of `docs/results.md`, the raw runs as JSON and a plot (the grid itself: mmprune/run/quality.py).
The default model is the SmolLM2 one (files `results.json`, `results_accuracy.png`); the tiny model
(EMBEDDED_MODEL=tiny or its --model_path) writes `results_tiny.json` / `results_accuracy_tiny.png`
and its own section. `--calibration cross-kind|generic` calibrates on data that differs from the
evaluated questions (llava/transfer.py) and writes `results_cross_kind.json` etc. and its own
section.
"""

from __future__ import annotations

import argparse
import sys

import torch

from llava.convert.loading import load_llava_next
from llava import transfer
from llava.data import encode_conversation, encode_record, load_records, select_task
from llava.embedded import paths as embedded
from llava.eval import DEFAULT_MAX_NEW_TOKENS, evaluate
from llava.model import MODALITY_NAMES, capture_decoder_inputs, decoder_layers
from mmprune.run import quality as grid
from mmprune.base.entry import run_main
from mmprune.prune.pipeline import LanguageHead
from mmprune.evaluate.realtext import realtext_perplexity
from mmprune.evaluate.transfer import TEXT_SHARE, english_source

METHODS = grid.METHODS
RESULTS_TITLE = "# Results on the embedded LLaVA-NeXT\n\nEach section is written by the command it names."
KINDS = {"color": "colour questions", "shape": "shape questions", "count": "count questions",
         "position": "position questions"}
CALIBRATION_HELP = {
    "in-task": "single questions of all four kinds drawn from the calibration pool (--task_name), the held-out "
               "split's own distribution",
    "cross-kind": "colour and shape questions about newly drawn images, evaluated on the count and position "
                  "questions only, per kind",
    "generic": "descriptions of newly drawn images (no question of the task) and, for one record "
               f"in {TEXT_SHARE}, text-only conversations about English passages of the Python standard library, "
               "evaluated on the whole held-out split",
}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m llava.quality", description=__doc__)
    parser.add_argument("--model_path", default=None,
                        help="default: the embedded model EMBEDDED_MODEL names (smol unless set to tiny)")
    parser.add_argument("--data_path", default=str(embedded.DATA_PATH))
    parser.add_argument("--image_folder", default=str(embedded.IMAGE_FOLDER))
    parser.add_argument("--task_split_path", default=str(embedded.TASK_SPLIT_PATH))
    parser.add_argument("--task_name", default=embedded.CALIBRATION_TASK)
    parser.add_argument("--eval_data_path", default=str(embedded.EVAL_DATA_PATH))
    parser.add_argument("--eval_image_folder", default=str(embedded.EVAL_IMAGE_FOLDER))
    grid.add_grid_arguments(parser, DEFAULT_MAX_NEW_TOKENS, "llava.quality", CALIBRATION_HELP)
    args = parser.parse_args(argv)
    if args.model_path is None:
        args.model_path = str(embedded.default_checkpoint())
    return args


def output_names(args) -> dict:
    """Section, JSON and plot names: the tiny model's results live beside the default's."""
    return grid.output_names("weight-pruning", "results", embedded.results_suffix(args.model_path),
                             grid.calibration_of(args))


def load(args) -> grid.GridModel:
    model, processor = load_llava_next(args.model_path, dtype=torch.float32)
    prefix, layers = decoder_layers(model)
    eval_records = transfer.evaluation_records(load_records(args.eval_data_path), args.calibration)[: args.eval_samples]
    records = load_records(args.data_path) if args.calibration == "in-task" else None

    def run_eval():
        result = evaluate(model, processor, eval_records, args.eval_image_folder, args.max_new_tokens, progress=False)
        if args.realtext_tokens:
            result["realtext"] = realtext_perplexity(model, processor.tokenizer, args.realtext_tokens).as_dict()
        return result

    def calibrate(seed):
        if records is not None:
            calib = select_task(records, args.task_split_path, args.task_name, args.nsamples, seed)
            samples = [encode_record(processor, r, args.image_folder, with_answer=True) for r in calib]
        else:  # generated from the seed, images in memory
            samples = [encode_conversation(processor, r, image, with_answer=True)
                       for r, image in transfer.calibration_samples(args.calibration, args.nsamples, seed)]
        return capture_decoder_inputs(model, samples, "cpu", "cpu", len(samples))

    return grid.GridModel(model, layers, prefix, LanguageHead(model.model.language_model.norm, model.lm_head),
                          MODALITY_NAMES, calibrate, run_eval)


def calibration_words(args) -> tuple[str, str, dict]:
    """(what the calibration data is, which held-out questions are evaluated, extra JSON meta) of
    the --calibration setting."""
    if args.calibration == "cross-kind":
        return (f"{' and '.join(transfer.CROSS_KIND_CALIBRATION)} questions only, about newly drawn images "
                "(generated from each seed, llava/transfer.py)",
                f"{' and '.join(transfer.CROSS_KIND_EVALUATION)} questions only",
                {"calibration_kinds": list(transfer.CROSS_KIND_CALIBRATION),
                 "evaluation_kinds": list(transfer.CROSS_KIND_EVALUATION)})
    if args.calibration == "generic":
        english = english_source()
        return (f"image descriptions of newly drawn images (no question of the task); one record in {TEXT_SHARE} "
                f"is a text-only conversation about an English passage ({english['source']}; {english['passages']} "
                f"passages, sha256 `{english['sha256'][:12]}…`, disjoint from the real-text corpus), generated from "
                "each seed (llava/transfer.py)", "", {"english_text": english})
    return (f"task `{args.task_name}` of `{embedded.shown(args.data_path)}` (single questions of every kind, the "
            "evaluation's distribution)", "",
            {"data_path": embedded.shown(args.data_path), "task_name": args.task_name})


def write_outputs(args, results: dict) -> None:
    names = output_names(args)
    calibration, evaluation, meta = calibration_words(args)
    section = grid.Section(
        name=names["section"], json_name=names["json"], plot_name=names["plot"],
        heading=grid.section_heading("Weight pruning", args.calibration, embedded.model_title(args.model_path)),
        producer="python -m llava.quality",
        command_prefix="EMBEDDED_MODEL=tiny " if embedded.is_tiny(args.model_path) else "",
        calibration=calibration, setting=args.calibration, evaluation=evaluation, kinds=KINDS,
        defaults=grid.make_defaults("quality", args.calibration, "seeds 42 43 44, 128 samples, every held-out "
                                    "question, 4,096 real-text tokens"),
        results_title=RESULTS_TITLE,
        meta={"model_path": embedded.shown(args.model_path), "eval_data_path": embedded.shown(args.eval_data_path),
              **meta})
    grid.write_section(args, results, section)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    transfer.check_args(args.calibration, args.nsamples, args.seeds)
    grid.check_outputs(args, output_names(args), [args.model_path, args.data_path, args.image_folder,
                                                  args.task_split_path, args.eval_data_path, args.eval_image_folder])
    grid.run(args, argv, load, write_outputs)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
