"""`python -m llava.quality`: the quality table of the embedded LLaVA-NeXT (or any checkpoint).
Prunes with every method at every sparsity setting and calibration seed, evaluates each pruned
model (held-out accuracy, answer perplexity, real-text perplexity of the decoder), and writes a
section of `docs/results.md`, the raw runs as JSON and a plot (the grid itself: mmprune/run/quality.py).
The default model is the SmolLM2 one (files `results.json`, `results_accuracy.png`); the tiny model
(EMBEDDED_MODEL=tiny or its --model_path) writes `results_tiny.json` / `results_accuracy_tiny.png`
and its own section.
"""

from __future__ import annotations

import argparse
import sys

import torch

from llava.convert import load_llava_next
from llava.data import encode_record, load_records, select_task
from llava.embedded import paths as embedded
from llava.eval import DEFAULT_MAX_NEW_TOKENS, evaluate
from llava.model import MODALITY_NAMES, capture_decoder_inputs, decoder_layers
from mmprune.run import quality as grid
from mmprune.base.entry import run_main
from mmprune.prune.pipeline import LanguageHead
from mmprune.evaluate.realtext import realtext_perplexity

METHODS = grid.METHODS
RESULTS_TITLE = "# Results on the embedded LLaVA-NeXT\n\nEach section is written by the command it names."


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
    grid.add_grid_arguments(parser, DEFAULT_MAX_NEW_TOKENS, "llava.quality")
    args = parser.parse_args(argv)
    if args.model_path is None:
        args.model_path = str(embedded.default_checkpoint())
    return args


def output_names(args) -> dict:
    """Section, JSON and plot names: the tiny model's results live beside the default's."""
    return grid.output_names("weight-pruning", "results", embedded.results_suffix(args.model_path))


def load(args) -> grid.GridModel:
    model, processor = load_llava_next(args.model_path, dtype=torch.float32)
    prefix, layers = decoder_layers(model)
    eval_records = load_records(args.eval_data_path)[: args.eval_samples]
    records = load_records(args.data_path)

    def run_eval():
        result = evaluate(model, processor, eval_records, args.eval_image_folder, args.max_new_tokens, progress=False)
        if args.realtext_tokens:
            result["realtext"] = realtext_perplexity(model, processor.tokenizer, args.realtext_tokens).as_dict()
        return result

    def calibrate(seed):
        calib = select_task(records, args.task_split_path, args.task_name, args.nsamples, seed)
        samples = [encode_record(processor, r, args.image_folder, with_answer=True) for r in calib]
        return capture_decoder_inputs(model, samples, "cpu", "cpu", len(samples))

    return grid.GridModel(model, layers, prefix, LanguageHead(model.model.language_model.norm, model.lm_head),
                          MODALITY_NAMES, calibrate, run_eval)


def write_outputs(args, results: dict) -> None:
    names = output_names(args)
    section = grid.Section(
        name=names["section"], json_name=names["json"], plot_name=names["plot"],
        heading=f"## Weight pruning: {embedded.model_title(args.model_path)}", producer="python -m llava.quality",
        command_prefix="EMBEDDED_MODEL=tiny " if embedded.is_tiny(args.model_path) else "",
        calibration=f"task `{args.task_name}`",
        defaults="`make quality` runs the defaults: seeds 42 43 44, 128 samples, every held-out question, "
                 "4,096 real-text tokens",
        results_title=RESULTS_TITLE,
        meta={"model_path": embedded.shown(args.model_path), "data_path": embedded.shown(args.data_path),
              "task_name": args.task_name, "eval_data_path": embedded.shown(args.eval_data_path)})
    grid.write_section(args, results, section)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    grid.check_outputs(args, output_names(args), [args.model_path, args.data_path, args.image_folder,
                                                  args.task_split_path, args.eval_data_path, args.eval_image_folder])
    grid.run(args, argv, load, write_outputs)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
