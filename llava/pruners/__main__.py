"""`python -m llava.pruners`: prune the LLM decoder of a LLaVA-NeXT checkpoint (TAMP and baselines).

Accepts the public TAMP code's flags. Without --model_path / --data_path it uses the README's real
paths when they exist, otherwise the embedded tiny default (with a banner saying so).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from llava.adapter import ADAPTER
from llava.convert.configs import is_llava_hf_checkpoint
from llava.convert.loading import check_processor_files, load_processor
from llava.data import (
    encode_record, has_answer, load_records, open_record_image, record_image,
)
from llava.embedded import paths as embedded
from llava.model import prune_vision_tower
from llava.parquet_data import draw_calibration, input_root, is_parquet_source
from mmprune.run.cli import (
    LoadedModel, add_eval_arguments, add_pruning_arguments, check_eval_samples, default_output_dir,
    prune_config_from_args, run_and_save, run_summary, set_cpu_threads, shard_bytes,
)
from mmprune.base.entry import OneLineErrorParser, run_main
from mmprune.run.checks import check_calibration_records
from mmprune.base.errors import UserInputError
from mmprune.base.output import check_output_dir
from mmprune.prune.pipeline import LanguageHead, PhaseTimer, check_pattern_fits
from mmprune.place.placement import offload_workspace, plan_placement, placement_requested
from mmprune.run.report import modality_summary

REAL_MODEL, REAL_DATA = embedded.REAL_MODEL, embedded.REAL_DATA
SAVE_PRETRAINED_SHARD = 50 * 10 ** 9  # transformers' default max_shard_size ("50GB")


def parse_args(argv):
    parser = OneLineErrorParser(prog="python -m llava.pruners", description=__doc__)
    data = parser.add_argument_group("model and calibration data")
    data.add_argument("--model_path", default=None, help=f"llava-hf or lmms-lab checkpoint (default {REAL_MODEL})")
    data.add_argument("--data_path", default=None, help="LLaVA-NeXT raw-format JSON, or the LLaVA-NeXT-Data parquet "
                      f"shards (a folder or a glob; the task is their data_source) (default {REAL_DATA})")
    data.add_argument("--image_folder", default=None, help="images are image_folder/<record image> (default: the JSON's folder)")
    data.add_argument("--task_split_path", default=None, help="task_split.json (default: beside the data JSON)")
    data.add_argument("--task_name", default="sharegpt4v",
                      help="calibration task (first folder of the record images; data_source in parquet shards)")
    add_pruning_arguments(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for models under 100M parameters on the CPU)")
    add_eval_arguments(parser, "raw-format JSON", "image_folder")
    return parser.parse_args(argv)


def check_images(records, image_folder) -> None:
    """Open every calibration image now, so a missing or corrupt file stops the run before the
    model is loaded."""
    for record in records:
        if record_image(record) is not None:
            open_record_image(record, image_folder).close()


def check_parquet_options(args) -> None:
    """Parquet shards carry their images and name each record's task (data_source): a task split
    or an image folder given with them is a mistake."""
    if not is_parquet_source(args.data_path):
        return
    given = [flag for flag, value in (("--task_split_path (TASK_SPLIT)", args.task_split_path),
                                      ("--image_folder (IMAGE_FOLDER)", args.image_folder)) if value]
    if given:
        raise UserInputError(f"--data_path {args.data_path} is parquet shards, whose records carry their images and "
                             f"whose data_source column is the task; drop {' and '.join(given)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = prune_config_from_args(args)
    uses_embedded = embedded.resolve_model_and_data(args)
    if args.eval is None:
        args.eval = uses_embedded
    output_dir = args.save_model or default_output_dir(args.model_path, cfg.name, args.llm_sparsity_ratio, args.sparsity_type)
    args.save_model = output_dir
    check_parquet_options(args)
    check_output_dir(output_dir, args.overwrite, [args.model_path, input_root(args.data_path), args.image_folder,
                                                   args.task_split_path, args.sparsity_dict, args.eval_data_path,
                                                   args.eval_image_folder])
    check_eval_samples(args)
    cfg.check_sparsity_dict_file()
    if is_llava_hf_checkpoint(args.model_path):  # an lmms-lab checkpoint's tokenizer is checked as it converts
        check_processor_files(args.model_path)

    timer = PhaseTimer()
    with timer.phase("load_data"):
        records = draw_calibration(args.data_path, args.task_split_path, args.task_name, args.nsamples, args.seed)
        check_images(records, args.image_folder)
        check_calibration_records(cfg, records, lambda r: record_image(r) is not None, has_answer, "an image")
        eval_records, eval_folder = None, None
        if args.eval:
            eval_path = args.eval_data_path or str(embedded.EVAL_DATA_PATH)
            eval_folder = args.eval_image_folder or (str(embedded.EVAL_IMAGE_FOLDER) if not args.eval_data_path
                                                     else os.path.dirname(os.path.abspath(eval_path)))
            eval_records = load_records(eval_path)[: args.eval_samples]
    placement = None
    if placement_requested(args):
        placement = plan_placement(args, args.model_path, method=cfg.pruner, nsamples=len(records),
                                   **calibration_lengths(args, records), device=cfg.device,
                                   protected=[args.model_path, args.data_path, args.image_folder, args.task_split_path,
                                              args.eval_data_path, args.eval_image_folder, output_dir],
                                   shard_bytes=shard_bytes(args) or SAVE_PRETRAINED_SHARD)
    with offload_workspace(placement) as offload_dir:
        report = prune_and_save(args, cfg, records, eval_records, eval_folder, output_dir, timer, placement,
                                offload_dir)
    sys.stderr.write(modality_summary(report) + "\n")
    print(json.dumps(run_summary(report, cfg, output_dir)))
    return 0


def calibration_lengths(args, records) -> dict:
    """Mean and longest calibration sequence in tokens, from the processor alone (no weights), so
    the placement can set their hidden states aside before the model is loaded."""
    if not is_llava_hf_checkpoint(args.model_path):
        raise UserInputError(f"--device_map/--max_memory/--offload_folder need a llava-hf checkpoint; convert "
                             f"{args.model_path} once with `python -m llava.convert --src {args.model_path} --dst DIR`")
    processor = load_processor(args.model_path)
    lengths = [encode_record(processor, r, args.image_folder, with_answer=True)["input_ids"].shape[1] for r in records]
    return {"seqlen": -(-sum(lengths) // max(len(lengths), 1)), "longest": max(lengths, default=1)}


def prune_and_save(args, cfg, records, eval_records, eval_folder, output_dir, timer, placement, offload_dir) -> dict:
    torch.manual_seed(args.seed)
    with timer.phase("load_model"):
        dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
        model, processor = ADAPTER.load(args.model_path, dtype=dtype,
                                        device_map=placement.device_map if placement else None,
                                        offload_folder=offload_dir)
    set_cpu_threads(model, args.threads, cfg.device)
    prefix, layers = ADAPTER.decoder_blocks(model)
    check_pattern_fits(layers, prefix, cfg.pattern)
    vit_ratio = float(args.vit_sparsity_ratio)

    def samples():
        return (encode_record(processor, r, args.image_folder, with_answer=True) for r in records)

    def evaluate():
        from llava.eval import evaluate as run_eval

        return run_eval(model, processor, eval_records, eval_folder, desc="evaluate")

    def prune_extra(timer):
        if vit_ratio <= 0:
            return {}
        with timer.phase("prune_vision_tower"):
            store_device = "cpu" if args.offload_activations else cfg.device
            return prune_vision_tower(model, samples(), vit_ratio, cfg.device, store_device, len(records))

    def save(folder):
        return ADAPTER.save(model, processor, folder, max_shard_size=shard_bytes(args), save_format=args.save_format,
                            sparsity_type=str(cfg.pattern))

    loaded = LoadedModel(
        name=os.path.basename(os.path.normpath(args.model_path)), path=args.model_path, kind="llava_next",
        model=model, blocks=layers, prefix=prefix, modality_names=ADAPTER.modality_names,
        capture=lambda device, store_device: ADAPTER.capture(model, samples(), device, store_device, len(records)),
        save=save, prune_extra=prune_extra, evaluate=evaluate if args.eval else None,
        head=LanguageHead(model.model.language_model.norm, model.lm_head), tokenizer=processor.tokenizer,
        placement=placement,
    )
    calibration = {"data_path": args.data_path, "image_folder": args.image_folder, "task_split_path": args.task_split_path,
                   "task_name": args.task_name, "nsamples": args.nsamples, "seed": args.seed,
                   "sample_ids": [r.get("id") for r in records], "full_conversations": True}
    return run_and_save(loaded, cfg, args, calibration, output_dir, timer)


if __name__ == "__main__":
    sys.exit(run_main(main))
