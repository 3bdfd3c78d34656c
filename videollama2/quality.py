"""`python -m videollama2.quality`: the quality table of the embedded VideoLLaMA2-AV (or any
checkpoint). Prunes the decoder with every method at every sparsity setting and calibration seed,
evaluates each pruned model (held-out accuracy overall and per question kind: video, audio, both;
answer perplexity; real-text perplexity of the decoder) and writes the section `av-weight-pruning`
of `docs/results.md` with the DAS diversity terms of the 6 modality pairs of one TAMP run, the raw
runs (`docs/results_av.json`) and plots (the grid itself: mmprune/run/quality.py). The default model
is the SmolLM2 one on the hard task; the tiny model (EMBEDDED_MODEL=tiny) gets `_tiny` files and
its own section. `--calibration cross-kind|generic` calibrates on clips and conversations that differ
from the evaluated questions (videollama2/transfer.py) and writes `results_av_cross_kind.json` etc.
and its own section.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from mmprune.run import quality as grid
from mmprune.base.entry import run_main
from mmprune.prune.pipeline import LanguageHead
from mmprune.evaluate.realtext import realtext_perplexity
from mmprune.evaluate.transfer import TEXT_SHARE, english_source
from videollama2 import transfer
from videollama2.checkpoint.loading import load_tokenizer
from videollama2.data import check_media, encode_record, load_records, select_samples
from videollama2.embedded import paths as embedded
from videollama2.eval import evaluate
from videollama2.media import MediaLoader
from videollama2.model import MODALITY_NAMES, VideoLLaMA2ForCausalLM, decoder_layers
from videollama2.pruning import capture_decoder_inputs

RESULTS_TITLE = "# Results on the embedded models\n\nEach section is written by the command it names."
KINDS = {"video": "video questions", "audio": "audio questions", "both": "questions on both streams"}
CALIBRATION_HELP = {
    "in-task": "questions of all three kinds drawn from --data_path, the held-out split's own distribution",
    "cross-kind": "video and audio questions about newly drawn clips, evaluated on the questions that need both "
                  "streams only",
    "generic": "descriptions of newly drawn clips (no question of the task) and, for one record "
               f"in {TEXT_SHARE}, text-only conversations about English passages of the Python standard library, "
               "evaluated on the whole held-out split",
}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m videollama2.quality", description=__doc__)
    parser.add_argument("--model_path", default=None,
                        help="default: the embedded model EMBEDDED_MODEL names (smol unless set to tiny)")
    parser.add_argument("--data_path", default=None, help="calibration JSON (default: the embedded model's task)")
    parser.add_argument("--data_folder", default=None, help="its media folder")
    parser.add_argument("--eval_data_path", default=None, help="held-out JSON (default: the embedded model's task)")
    parser.add_argument("--eval_data_folder", default=None, help="its media folder")
    grid.add_grid_arguments(parser, 4, "videollama2.quality", CALIBRATION_HELP)
    args = parser.parse_args(argv)
    if args.model_path is None:
        args.model_path = str(embedded.default_checkpoint())
    task = embedded.embedded_data(args.model_path)
    if args.data_path is None:
        args.data_path, args.data_folder = str(task.data_path), args.data_folder or str(task.media_folder)
    if args.eval_data_path is None:
        args.eval_data_path = str(task.eval_data_path)
        args.eval_data_folder = args.eval_data_folder or str(task.media_folder)
    args.data_folder = args.data_folder or str(Path(args.data_path).parent)
    args.eval_data_folder = args.eval_data_folder or str(Path(args.eval_data_path).parent)
    return args


def output_names(args) -> dict:
    return grid.output_names("av-weight-pruning", "results_av", embedded.results_suffix(args.model_path),
                             grid.calibration_of(args))


def load(args) -> grid.GridModel:
    model = VideoLLaMA2ForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(args.model_path)
    prefix, layers = decoder_layers(model)
    media = MediaLoader.for_config(model.config, model.image_size)
    eval_records = transfer.evaluation_records(load_records(args.eval_data_path), args.calibration)[: args.eval_samples]
    check_media(eval_records, args.eval_data_folder, media)
    records = load_records(args.data_path) if args.calibration == "in-task" else None
    variant = embedded.embedded_data(args.model_path).variant

    def run_eval():
        result = evaluate(model, tokenizer, eval_records, args.eval_data_folder, media, args.max_new_tokens,
                          progress=False)
        if args.realtext_tokens:
            result["realtext"] = realtext_perplexity(model, tokenizer, args.realtext_tokens).as_dict()
        return result

    def calibrate(seed):
        if records is not None:
            calib = select_samples(records, args.nsamples, seed)
            check_media(calib, args.data_folder, media)
            samples = (encode_record(tokenizer, r, args.data_folder, media, with_answer=True) for r in calib)
            return capture_decoder_inputs(model, samples, "cpu", "cpu", len(calib))
        # generated from the seed and encoded to mp4 like the data files; uncached, the folder goes afterwards
        pairs = transfer.calibration_records(args.calibration, args.nsamples, seed, variant)
        clips = MediaLoader.for_config(model.config, model.image_size, cache=False)
        with tempfile.TemporaryDirectory(prefix="mmprune-transfer-") as folder:
            calib = transfer.write_clips(pairs, folder, variant)
            samples = (encode_record(tokenizer, r, folder, clips, with_answer=True) for r in calib)
            return capture_decoder_inputs(model, samples, "cpu", "cpu", len(calib))

    return grid.GridModel(model, layers, prefix, LanguageHead(model.model.norm, model.lm_head), MODALITY_NAMES,
                          calibrate, run_eval)


def calibration_words(args) -> tuple[str, str, dict]:
    """(what the calibration data is, which held-out questions are evaluated, extra JSON meta) of
    the --calibration setting."""
    variant = embedded.embedded_data(args.model_path).variant
    if args.calibration == "cross-kind":
        return (f"{' and '.join(transfer.CROSS_KIND_CALIBRATION)} questions only, about newly drawn clips of the "
                f"{variant} task (generated from each seed, videollama2/transfer.py)",
                "questions on both streams only",
                {"calibration_kinds": list(transfer.CROSS_KIND_CALIBRATION),
                 "evaluation_kinds": list(transfer.CROSS_KIND_EVALUATION), "variant": variant})
    if args.calibration == "generic":
        english = english_source()
        return (f"descriptions of newly drawn clips of the {variant} task (no question of the task); one record in "
                f"{TEXT_SHARE} is a text-only conversation about an English passage ({english['source']}; "
                f"{english['passages']} passages, sha256 `{english['sha256'][:12]}…`, disjoint from the real-text "
                "corpus), generated from each seed (videollama2/transfer.py)", "",
                {"english_text": english, "variant": variant})
    return (f"`{embedded.shown(args.data_path)}` (full conversations with their video and audio, questions of every "
            "kind: the evaluation's distribution)", "", {"data_path": embedded.shown(args.data_path)})


def write_outputs(args, results: dict) -> None:
    names = output_names(args)
    calibration, evaluation, meta = calibration_words(args)
    section = grid.Section(
        name=names["section"], json_name=names["json"], plot_name=names["plot"],
        heading=grid.section_heading("Weight pruning", args.calibration, embedded.model_title(args.model_path)),
        producer="python -m videollama2.quality",
        command_prefix="EMBEDDED_MODEL=tiny " if embedded.is_tiny(args.model_path) else "",
        calibration=calibration, setting=args.calibration, evaluation=evaluation,
        defaults=grid.make_defaults("quality-av", args.calibration, "seeds 42 43 44, 128 samples, every held-out "
                                    "question, 4,096 real-text tokens"),
        results_title=RESULTS_TITLE, kinds=KINDS, das_terms=True,
        meta={"model_path": embedded.shown(args.model_path), "eval_data_path": embedded.shown(args.eval_data_path),
              **meta})
    grid.write_section(args, results, section)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    transfer.check_args(args.calibration, args.nsamples, args.seeds)
    grid.check_outputs(args, output_names(args), [args.model_path, args.data_path, args.data_folder,
                                                  args.eval_data_path, args.eval_data_folder])
    grid.run(args, argv, load, write_outputs)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
