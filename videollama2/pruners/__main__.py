"""`python -m videollama2.pruners`: prune the LLM decoder of a VideoLLaMA2.1-AV checkpoint (TAMP
and baselines), calibrating on audio-visual AVInstruct data.

Accepts the public TAMP code's flags (--model_path --data_path --data_folder --nsamples --seed
--llm_sparsity_ratio --vit_sparsity_ratio --aud_sparsity_ratio --sparsity_type --prune_method
--token_selection --score_method ...). Without --model_path / --data_path it uses the public
scripts' real paths when they exist, otherwise the embedded default (EMBEDDED_MODEL: the SmolLM2 model
on the hard task, or the tiny one on the basic task; with a banner).
Per-token modality ids are 0 text, 1 video, 2 audio, so DAS scores 6 diversity terms.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from mmprune.run.cli import (
    LoadedModel, add_eval_arguments, add_pruning_arguments, check_eval_samples, default_output_dir, prune_config_from_args, run_and_save, run_summary, set_cpu_threads, shard_bytes,
)
from mmprune.base.entry import OneLineErrorParser, run_main
from mmprune.run.checks import check_calibration_records, check_draw, check_tokenizer_files
from mmprune.embedded.defaults import announce
from mmprune.base.errors import UserInputError
from mmprune.place.offload import is_dispatched
from mmprune.base.output import check_output_dir
from mmprune.prune.pipeline import LanguageHead, PhaseTimer, check_pattern_fits
from mmprune.place.placement import compute_key, offload_workspace, plan_placement, placement_requested
from mmprune.run.report import modality_summary
from mmprune.prune.sparsity import check_ratio
from videollama2.adapter import ADAPTER
from videollama2.checkpoint.loading import load_tokenizer
from videollama2.checkpoint.saving import DEFAULT_SHARD_BYTES, vision_tower_inside
from videollama2.config import VideoLLaMA2Config
from videollama2.data import check_media, encode_record, has_answer, load_records, select_samples
from videollama2.embedded import paths as embedded
from videollama2.media import MediaLoader
from videollama2.pruning import prune_tower

REAL_MODEL, REAL_DATA, REAL_MEDIA = embedded.REAL_MODEL, embedded.REAL_DATA, embedded.REAL_MEDIA


def parse_args(argv):
    parser = OneLineErrorParser(prog="python -m videollama2.pruners", description=__doc__)
    data = parser.add_argument_group("model and calibration data")
    data.add_argument("--model_path", default=None, help=f"VideoLLaMA2.1-AV checkpoint folder (default {REAL_MODEL})")
    data.add_argument("--data_path", default=None, help=f"AVInstruct-format JSON (default {REAL_DATA})")
    data.add_argument("--data_folder", default=None,
                      help=f"media are data_folder/<record video|audio> (default {REAL_MEDIA} for the default data, "
                           "else the JSON's folder)")
    data.add_argument("--sample_select", choices=["random", "longest"], default="random",
                      help="calibration draw: random (seeded, as the public code) or the longest conversations")
    add_pruning_arguments(parser)
    towers = parser.add_argument_group("towers")
    towers.add_argument("--aud_sparsity_ratio", default="0", help="Wanda sparsity of the BEATs encoder's linears "
                                                                  "(0: untouched)")
    towers.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for models under 50M parameters on the CPU, whose small "
                             "matrices gain nothing from threads, else torch's default)")
    add_eval_arguments(parser, "AVInstruct-format JSON", "data_folder")
    return parser.parse_args(argv)


def resolve_paths(args) -> bool:
    """Fill in defaults; returns whether an embedded model is used. Explicit paths are never
    replaced: a missing one is reported by the loaders."""
    notes: list = []
    uses_embedded = embedded.resolve_model(args, notes)
    task = embedded.embedded_data(args.model_path)
    if args.data_path is None:
        if os.path.isfile(REAL_DATA):
            args.data_path = REAL_DATA
            args.data_folder = args.data_folder or REAL_MEDIA
        else:
            args.data_path = str(task.data_path)
            args.data_folder = args.data_folder or str(task.media_folder)
            notes.append(f"data:  {REAL_DATA} not found -> EMBEDDED {task.title} {embedded.shown(args.data_path)}")
    args.data_folder = args.data_folder or os.path.dirname(os.path.abspath(args.data_path))
    announce(notes, "MODEL_PATH / DATA_PATH / DATA_FOLDER (or --model_path / --data_path / --data_folder)")
    return uses_embedded


def longest(records: list, nsamples: int) -> list:
    """The public code's `longest` draw: the nsamples records with the most conversation characters."""
    lengths = [sum(len(turn["value"]) for turn in r["conversations"]) for r in records]
    return [records[int(i)] for i in np.argsort(lengths, kind="stable")[-nsamples:]]


def image_size_of(config: VideoLLaMA2Config) -> int:
    return config.vision_config().image_size if config.has_vision else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.save_format != "dense":  # before any work; the released layout is what its loaders read
        raise UserInputError(f"--save_format {args.save_format} is for LLaVA-NeXT checkpoints; VideoLLaMA2-AV "
                             "outputs keep the released layout with dense weights: drop --save_format (or SAVE_FORMAT)")
    cfg = prune_config_from_args(args)
    aud_ratio = check_ratio(args.aud_sparsity_ratio, "--aud_sparsity_ratio")
    vit_ratio = float(args.vit_sparsity_ratio)
    uses_embedded = resolve_paths(args)
    if args.eval is None:
        args.eval = uses_embedded
    output_dir = args.save_model or default_output_dir(args.model_path, cfg.name, args.llm_sparsity_ratio,
                                                       args.sparsity_type)
    args.save_model = output_dir
    check_output_dir(output_dir, args.overwrite, [args.model_path, args.data_path, args.data_folder, args.sparsity_dict,
                                                   args.eval_data_path, args.eval_data_folder])
    check_eval_samples(args)
    cfg.check_sparsity_dict_file()

    timer = PhaseTimer()
    config = VideoLLaMA2Config.from_dir(args.model_path)
    check_tokenizer_files(args.model_path)  # before the data and the weights
    if vit_ratio > 0 and not config.has_vision:
        raise UserInputError("--vit_sparsity_ratio is set but the checkpoint has no vision tower")
    if aud_ratio > 0 and not config.has_audio:
        raise UserInputError("--aud_sparsity_ratio is set but the checkpoint has no audio tower")
    media = MediaLoader.for_config(config, image_size_of(config))
    with timer.phase("load_data"):
        records = load_records(args.data_path)
        if args.sample_select == "longest":
            check_draw(args.nsamples, len(records), f"data file {args.data_path}")
            records = longest(records, args.nsamples)
        else:
            records = select_samples(records, args.nsamples, args.seed)
        check_calibration_records(cfg, records, lambda r: bool(r.get("video") or r.get("audio")), has_answer,
                                  "a video or audio")
        check_media(records, args.data_folder, media)
        eval_records, eval_folder = None, None
        if args.eval:
            task = embedded.embedded_data(args.model_path)
            eval_path = args.eval_data_path or str(task.eval_data_path)
            eval_folder = args.eval_data_folder or (str(task.media_folder) if not args.eval_data_path
                                                    else os.path.dirname(os.path.abspath(eval_path)))
            eval_records = load_records(eval_path)[: args.eval_samples]
            check_media(eval_records, eval_folder, media)
    placement = None
    if placement_requested(args):
        placement = plan_placement(args, args.model_path, method=cfg.pruner, nsamples=len(records),
                                   **calibration_lengths(args, records, media), device=cfg.device,
                                   protected=[args.model_path, args.data_path, args.data_folder, args.eval_data_path,
                                              args.eval_data_folder, output_dir],
                                   shard_bytes=shard_bytes(args) or largest_weight_file(args.model_path))
    with offload_workspace(placement) as offload_dir:
        report = prune_and_save(args, cfg, config, records, media, eval_records, eval_folder, vit_ratio, aud_ratio,
                                output_dir, timer, placement, offload_dir)
    sys.stderr.write(modality_summary(report) + "\n")
    print(json.dumps(run_summary(report, cfg, output_dir)))
    return 0


def calibration_lengths(args, records, media) -> dict:
    """Mean and longest calibration sequence in tokens (text plus the media tokens the config
    gives), without weights, so the placement can set their hidden states aside before loading."""
    from mmprune.place.plan import empty_model

    tokenizer = load_tokenizer(args.model_path)
    shapes = empty_model(args.model_path)[0]  # on the meta device: only the token counts are read
    video = shapes.video_token_count() if shapes.config.has_vision else 0
    audio = shapes.audio_token_count() if shapes.config.has_audio else 0
    lengths = []
    for record in records:
        encoded = encode_record(tokenizer, record, args.data_folder, media, with_answer=True)
        ids = encoded["input_ids"][0]
        lengths.append(ids.numel() - int((ids < 0).sum()) + video * ("video" in encoded) + audio * ("audio" in encoded))
    return {"seqlen": -(-sum(lengths) // max(len(lengths), 1)), "longest": max(lengths, default=1)}


def largest_weight_file(model_path) -> int:
    """The biggest weight file of a checkpoint: saving in its layout holds one such file in memory."""
    sizes = [p.stat().st_size for p in Path(model_path).iterdir()
             if p.suffix in (".safetensors", ".bin") and p.is_file()]
    return max(sizes, default=DEFAULT_SHARD_BYTES)


def prune_and_save(args, cfg, config, records, media, eval_records, eval_folder, vit_ratio, aud_ratio, output_dir,
                   timer, placement, offload_dir) -> dict:
    torch.manual_seed(args.seed)
    with timer.phase("load_model"):
        dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
        where = {}
        if placement is not None:
            compute = compute_key(cfg.device)
            where = {"device_map": placement.device_map, "offload_dir": offload_dir,
                     "main_device": compute if compute in placement.device_map.values() else None}
        model, tokenizer = ADAPTER.load(args.model_path, dtype=dtype, **where)
    prefix, layers = ADAPTER.decoder_blocks(model)
    check_pattern_fits(layers, prefix, cfg.pattern)
    args.threads_resolved = set_cpu_threads(model, args.threads, cfg.device)

    def samples():
        return (encode_record(tokenizer, r, args.data_folder, media, with_answer=True) for r in records)

    def evaluate():
        from videollama2.eval import evaluate as run_eval

        if not is_dispatched(model):  # a placed model stays where accelerate put it
            model.to(cfg.device)
        return run_eval(model, tokenizer, eval_records, eval_folder, media, desc="evaluate")

    def prune_extra(timer):
        extra = {}
        store_device = "cpu" if args.offload_activations else cfg.device
        for which, ratio in (("vit", vit_ratio), ("aud", aud_ratio)):
            if ratio > 0:
                with timer.phase(f"prune_{'vision' if which == 'vit' else 'audio'}_tower"):
                    extra.update(prune_tower(model, which, samples(), ratio, cfg.device, store_device, len(records)))
        return extra

    # a pruned (or earlier saved) SigLIP goes into its own folder, which upstream's loader reads
    standalone_tower = config.has_vision and (vit_ratio > 0 or vision_tower_inside(config, args.model_path))

    def save(folder):
        # --max_shard_size re-shards; otherwise the source's files are kept
        ADAPTER.save(model, tokenizer, folder, max_shard_size=shard_bytes(args),
                     final_dir=output_dir if standalone_tower else None)

    loaded = LoadedModel(
        name=os.path.basename(os.path.normpath(args.model_path)), path=args.model_path, kind="videollama2_av",
        model=model, blocks=layers, prefix=prefix, modality_names=ADAPTER.modality_names,
        capture=lambda device, store_device: ADAPTER.capture(model, samples(), device, store_device, len(records)),
        save=save, prune_extra=prune_extra, evaluate=evaluate if args.eval else None,
        head=LanguageHead(model.model.norm, model.lm_head), tokenizer=tokenizer, placement=placement,
    )
    calibration = {"data_path": args.data_path, "data_folder": args.data_folder, "nsamples": args.nsamples,
                   "seed": args.seed, "sample_select": args.sample_select,
                   "sample_ids": [r.get("id") for r in records], "full_conversations": True,
                   "video_tokens_per_sample": model.video_token_count() if config.has_vision else 0,
                   "audio_tokens_per_sample": model.audio_token_count() if config.has_audio else 0}
    return run_and_save(loaded, cfg, args, calibration, output_dir, timer)


if __name__ == "__main__":
    sys.exit(run_main(main))
