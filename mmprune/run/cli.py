"""Command-line pieces shared by the model entry points (`python -m llava.pruners`, ...):
the public TAMP flags, the options that name each semantic choice, the mapping of the public
flag combinations onto presets, and the run-and-save sequence with its report."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from mmprune.prune.selection.atv import GROUPINGS, ATVConfig
from mmprune.prune.selection.token_rules import AttentionWeightConfig
from mmprune.prune.calibration import CalibrationStore
from mmprune.prune.allocation.das import DASConfig
from mmprune.run.checks import check_seed, resolve_device
from mmprune.prune.allocation.ecoflap import ECoFLaPConfig
from mmprune.prune.allocation.owl import OWLConfig
from mmprune.base.errors import UserInputError
from mmprune.place.offload import folder_bytes, metering
from mmprune.base.output import atomic_output_dir
from mmprune.base.sparse_format import SAVE_FORMATS, check_save_format, weight_bytes
from mmprune.place.placement import Placement, add_placement_arguments, placement_report
from mmprune.place.options import parse_device_map, parse_max_memory, parse_size
from mmprune.base.memory import peak_memory
from mmprune.prune.pipeline import (
    PRESETS, LanguageHead, PhaseTimer, PruneConfig, PruneOutcome, default_amia, file_plan, prune_decoder,
)
from mmprune.evaluate.realtext import add_realtext_argument, realtext_perplexity
from mmprune.run.report import build_report, plot_sparsity, write_report
from mmprune.prune.sparsity import SparsityPattern, check_ratio
from mmprune.prune.sparsity_dict import write_sparsity_dict


def add_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    public = parser.add_argument_group("public TAMP code flags")
    public.add_argument("--seed", type=int, default=42)
    public.add_argument("--nsamples", type=int, default=128)
    public.add_argument("--llm_sparsity_ratio", default="0.5", help="target sparsity T of the decoder linears, in [0, 1)")
    public.add_argument("--vit_sparsity_ratio", default="0", help="Wanda sparsity of the vision tower's linears (0: untouched)")
    public.add_argument("--sparsity_type", default="unstructured", help="unstructured, 2:4 or 4:8 (any N:M with N/M = ratio)")
    public.add_argument("--prune_method", default="wanda", help="public code's method name (wanda); see --method")
    public.add_argument("--token_selection", default="naive",
                        help="naive (all tokens) or amia (with --prune_method sparsegpt: AMIA's tokens in the Hessian)")
    public.add_argument("--score_method", default=None, help="density_sum selects DAS (public code)")
    public.add_argument("--sparsity_ratio_granularity", default=None, help="layer (per linear) or block, for DAS")
    public.add_argument("--max_sparsity_per_layer", type=float, default=None, help="cap of the allocation (default T + 0.1)")
    public.add_argument("--sparsity_dict", default=None, help="reuse a sparsity_dict.yaml (skips the allocation sweep)")
    public.add_argument("--save_model", default=None, help="output folder (default checkpoints/<model>_<method>_<T>_<type>)")
    public.add_argument("--conv_mode", default=None, help="accepted for compatibility; the model's chat template is used")
    public.add_argument("--save", default=None, help="accepted for compatibility (the public code's log folder)")

    ours = parser.add_argument_group("semantic choices (defaults reproduce the public code)")
    ours.add_argument("--method", choices=sorted(PRESETS), default=None,
                      help="preset; overrides the mapping of --prune_method/--score_method/--token_selection")
    ours.add_argument("--similarity_mode", choices=["positive", "mean"], default="positive",
                      help="DAS/AMIA cosine similarity: positive (public code) or mean (paper text)")
    ours.add_argument("--das_granularity", choices=["linear", "block"], default=None,
                      help="score each linear on its output (public code) or each block on its output")
    ours.add_argument("--allocation", choices=["waterfill", "inverse"], default="waterfill",
                      help="DAS allocation: waterfill (public code) or sparsity proportional to 1/score (paper)")
    ours.add_argument("--amia_features", choices=["output", "input"], default=None,
                      help="rank tokens on each linear's output (default with Wanda) or input (default with SparseGPT)")
    ours.add_argument("--amia_scope", choices=["linear", "block"], default=None, help="default linear")
    ours.add_argument("--amia_knn", type=int, default=3)
    ours.add_argument("--amia_mmd_scale", type=float, default=0.1,
                      help="AMIA stops when MMD^2 < scale * sqrt(1 - rho); 0 keeps every token")
    ours.add_argument("--token_weight_floor", type=float, default=0.1,
                      help="attention token weights (attn-sparsegpt, tamp-obs-attn): N a clamped to [floor, cap], "
                           "then scaled to mean 1; floor > 0 keeps every token")
    ours.add_argument("--token_weight_cap", type=float, default=10.0)
    ours.add_argument("--atv_alpha", type=float, default=1.0,
                      help="ATV (atv, atv-obs): visual tokens per sample k = round(min(1, alpha * mean drift) * "
                           "n_text), at most n_visual (default 1, the paper's; 0 counts text tokens only)")
    ours.add_argument("--atv_modalities", choices=GROUPINGS, default="separate",
                      help="ATV with several non-text modalities (VideoLLaMA2: video, audio): each on its own "
                           "drift and k (separate, default) or all as one visual set (pooled)")
    ours.add_argument("--row_rounding", choices=["distribute", "floor"], default="distribute",
                      help="per-row prune counts: exact total per matrix (default) or floor(C*s) per row (Wanda)")
    ours.add_argument("--magnitude_group", choices=["matrix", "row"], default="matrix",
                      help="magnitude: threshold per matrix (default) or per output row")
    ours.add_argument("--owl_M", type=float, default=5.0, help="OWL outlier multiple M")
    ours.add_argument("--owl_lambda", type=float, default=0.08, help="OWL sparsity spread lambda")
    ours.add_argument("--ecoflap_samples", type=int, default=None,
                      help="calibration samples for ECoFLaP's zeroth-order estimate (default: all)")
    ours.add_argument("--ecoflap_epsilon", type=float, default=1e-3)

    run = parser.add_argument_group("run")
    run.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    run.add_argument("--offload_activations", action="store_true",
                     help="keep captured hidden states on the CPU between blocks (large models)")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    run.add_argument("--save_format", default="dense", choices=list(SAVE_FORMATS),
                     help="dense (zeros stored) or compressed: the decoder linears in compressed-tensors' sparse "
                          "format (bitmask; 2:4 for --sparsity_type 2:4), mmprune/base/sparse_format.py")
    add_placement_arguments(parser)


_PUBLIC_SCORE_METHODS = {None: "uniform", "": "uniform", "uniform": "uniform", "density_sum": "das",
                         "outlier_sum": "owl", "olmezo-gradient_sum": "ecoflap"}


def resolve_method(args: argparse.Namespace) -> tuple[str, str | None, str | None]:
    """Map the public code's flag combination onto (preset, layer-wise override, pruner override);
    an explicit --method wins."""
    if args.method:
        return args.method, None, None
    if args.prune_method not in ("wanda", "sparsegpt", "magnitude"):
        raise UserInputError(f"--prune_method must be wanda, sparsegpt or magnitude, got {args.prune_method!r}")
    if args.token_selection not in ("naive", "amia"):
        raise UserInputError(f"--token_selection must be naive or amia, got {args.token_selection!r}")
    if args.score_method not in _PUBLIC_SCORE_METHODS:
        raise UserInputError(
            f"--score_method must be one of density_sum (DAS), outlier_sum (OWL), olmezo-gradient_sum "
            f"(ECoFLaP), or omitted; got {args.score_method!r}"
        )
    layerwise = _PUBLIC_SCORE_METHODS[args.score_method]
    amia = args.token_selection == "amia"
    if args.prune_method == "sparsegpt" and amia:  # AMIA's tokens in SparseGPT's Hessian
        if layerwise == "das":
            return "tamp-obs", None, None
        return "amia-sparsegpt", None if layerwise == "uniform" else layerwise, None
    if args.prune_method != "wanda":
        if amia:
            raise UserInputError("--token_selection amia applies to --prune_method wanda or sparsegpt, not "
                                 f"{args.prune_method}")
        if layerwise == "uniform":
            return args.prune_method, None, None
        return args.prune_method, layerwise, None  # e.g. OWL allocation with SparseGPT
    if layerwise in ("owl", "ecoflap"):
        if amia:
            return "amia", layerwise, None
        return layerwise, None, None
    das = layerwise == "das"
    return {(True, True): "tamp", (True, False): "das", (False, True): "amia", (False, False): "wanda"}[(das, amia)], None, None


def das_granularity(args: argparse.Namespace) -> str:
    if args.das_granularity:
        return args.das_granularity
    public = args.sparsity_ratio_granularity
    if public in (None, "", "layer"):
        return "linear"  # the public code's "layer" scores each linear on its own output
    if public == "block":
        return "block"
    raise UserInputError(f"--sparsity_ratio_granularity must be layer or block, got {public!r}")


def default_device(requested: str | None) -> str:
    return resolve_device(requested)


def prune_config_from_args(args: argparse.Namespace) -> PruneConfig:
    ratio = check_ratio(args.llm_sparsity_ratio)
    check_ratio(args.vit_sparsity_ratio, "--vit_sparsity_ratio")
    pattern = SparsityPattern.parse(args.sparsity_type)
    check_seed(args.seed)
    if args.nsamples < 1:
        raise UserInputError(f"--nsamples must be at least 1, got {args.nsamples}")
    if args.amia_knn < 1:
        raise UserInputError(f"--amia_knn must be at least 1, got {args.amia_knn}")
    if not args.amia_mmd_scale >= 0 or args.amia_mmd_scale == float("inf"):
        raise UserInputError(f"--amia_mmd_scale must be a finite number >= 0 (0 keeps every token), got {args.amia_mmd_scale}")
    token_weights = AttentionWeightConfig(floor=args.token_weight_floor, cap=args.token_weight_cap)
    cap = args.max_sparsity_per_layer
    if cap is not None and not 0 < cap <= 1:
        raise UserInputError(f"--max_sparsity_per_layer must be in (0, 1], got {cap}")
    mode = args.similarity_mode
    method, layerwise, pruner = resolve_method(args)
    amia = default_amia(pruner or PRESETS[method][1])
    amia = replace(amia, knn=args.amia_knn, similarity_mode=mode, mmd_scale=args.amia_mmd_scale,
                   features=args.amia_features or amia.features, scope=args.amia_scope or amia.scope)
    if args.ecoflap_samples is not None and args.ecoflap_samples < 1:
        raise UserInputError(f"--ecoflap_samples must be at least 1, got {args.ecoflap_samples}")
    if not args.ecoflap_epsilon > 0:
        raise UserInputError(f"--ecoflap_epsilon must be positive, got {args.ecoflap_epsilon}")
    if not 0 <= args.owl_lambda < 1 or args.owl_M <= 0:
        raise UserInputError(f"--owl_lambda must be in [0, 1) and --owl_M positive, got {args.owl_lambda}, {args.owl_M}")
    # the placement flags' syntax now; the placement itself is decided before loading (plan_placement)
    parse_max_memory(args.max_memory)
    if args.device_map is not None:
        parse_device_map(args.device_map)
    shard_bytes(args)
    check_save_format(getattr(args, "save_format", "dense"))
    return PruneConfig(
        method=method,
        layerwise_override=layerwise,
        pruner_override=pruner,
        owl=OWLConfig(outlier_multiple=args.owl_M, spread=args.owl_lambda),
        ecoflap=ECoFLaPConfig(epsilon=args.ecoflap_epsilon, samples=args.ecoflap_samples, seed=args.seed),
        magnitude_group=args.magnitude_group,
        sparsity=ratio,
        pattern=pattern,
        max_sparsity_per_layer=cap,
        das=DASConfig(similarity_mode=mode, granularity=das_granularity(args), allocation=args.allocation),
        amia=amia,
        token_weights=token_weights,
        atv=ATVConfig(alpha=args.atv_alpha, grouping=args.atv_modalities),
        row_rounding=args.row_rounding,
        sparsity_dict_path=args.sparsity_dict,
        device=default_device(args.device),
    )


def shard_bytes(args: argparse.Namespace) -> int | None:
    """--max_shard_size in bytes (None: the model side's default)."""
    return parse_size(args.max_shard_size, "--max_shard_size") if args.max_shard_size else None


def default_output_dir(model_path: str, method: str, ratio: str, sparsity_type: str) -> str:
    name = os.path.basename(os.path.normpath(model_path))
    return os.path.join("checkpoints", f"{name}_{method}_{ratio}_{sparsity_type}")


@dataclass
class LoadedModel:
    """What a model side hands to `run_and_save`."""

    name: str
    path: str
    kind: str
    model: nn.Module
    blocks: nn.ModuleList
    prefix: str  # runtime name of the decoder layer list
    modality_names: dict[int, str]
    capture: Callable[[str, str], CalibrationStore]  # (device, store_device) -> store
    save: Callable[[str], dict | None]  # writes the checkpoint (and processor files) into a folder
    prune_extra: Callable[[PhaseTimer], dict] | None = None  # e.g. vision-tower pruning
    evaluate: Callable[[], dict] | None = None
    head: LanguageHead | None = None  # final norm + LM head (ECoFLaP's loss)
    tokenizer: object = None  # the text tokenizer, for the real-text perplexity
    placement: Placement | None = None  # where accelerate put the weights (None: all loaded on the CPU)


def run_and_save(loaded: LoadedModel, cfg: PruneConfig, args: argparse.Namespace, calibration: dict,
                 output_dir: str, timer: PhaseTimer) -> dict:
    """Capture, prune, evaluate, and write the output folder atomically. Returns the report."""
    # weights in memory per device and offload traffic, from the loaded model to the saved files
    offload_dir = loaded.placement.offload_dir if loaded.placement is not None else None
    with metering(loaded.model, written_before=folder_bytes(offload_dir)) as meter:
        if cfg.layerwise == "file":
            file_plan(loaded.blocks, loaded.prefix, cfg)  # a dict that does not fit fails before any sweep
        evaluation = {}
        if loaded.evaluate is not None:
            with timer.phase("evaluate_dense"):
                evaluation["dense"] = loaded.evaluate()
        tokens = getattr(args, "realtext_tokens", 0) if loaded.tokenizer is not None else 0
        realtext = {}
        if tokens:
            with timer.phase("realtext_dense"):
                realtext["dense"] = realtext_perplexity(loaded.model, loaded.tokenizer, tokens, device=cfg.device)
        store_device = "cpu" if args.offload_activations else cfg.device
        store = None
        if cfg.needs_calibration:
            with timer.phase("capture"):
                store = loaded.capture(cfg.device, store_device)
            calibration = dict(calibration, tokens_per_modality=store.token_counts(loaded.modality_names),
                               nsamples_captured=len(store))
            calibration["mean_tokens_per_sample"] = round(sum(h.shape[1] for h in store.hidden) / max(len(store), 1), 1)
        else:
            calibration = dict(calibration, used=False, note="magnitude pruning reads no calibration data")
        outcome: PruneOutcome = prune_decoder(loaded.blocks, loaded.prefix, store, cfg, loaded.modality_names, timer,
                                              loaded.head)
        del store
        extra = loaded.prune_extra(timer) if loaded.prune_extra else {}
        if loaded.evaluate is not None:
            with timer.phase("evaluate_pruned"):
                evaluation["pruned"] = loaded.evaluate()
        if realtext:
            with timer.phase("realtext_pruned"):
                realtext["pruned"] = realtext_perplexity(loaded.model, loaded.tokenizer, tokens, device=cfg.device)
        extra = dict(extra, realtext={k: r.as_dict() for k, r in realtext.items()}) if realtext else extra
        options = {k: v for k, v in vars(args).items()}
        options["resolved_method"] = cfg.method
        options["layerwise_resolved"] = cfg.layerwise
        options["pruner_resolved"] = cfg.pruner
        options["das_granularity_resolved"] = cfg.das.granularity
        options["amia_resolved"] = {"features": cfg.amia.features, "scope": cfg.amia.scope}
        options["max_sparsity_per_layer_resolved"] = cfg.max_sparsity_per_layer
        options["device_resolved"] = cfg.device
        with timer.phase("save"), atomic_output_dir(output_dir, args.overwrite) as staging:
            meter.reset_copies()
            saved = loaded.save(staging) or {}
            save_copies_peak = meter.copies_peak  # weights copied into memory to write them
            checkpoint = {"save_format": getattr(args, "save_format", "dense"), **saved,
                          "weight_file_bytes": weight_bytes(staging)}
            write_sparsity_dict(os.path.join(staging, "sparsity_dict.yaml"), outcome.plan)
            plot_sparsity(os.path.join(staging, "sparsity.png"), outcome,
                          f"{loaded.name}: {cfg.name} T={cfg.sparsity:g} {cfg.pattern}")
            report = build_report(
                outcome, method=cfg.name, options=options, calibration=calibration, timings=timer.seconds,
                memory=peak_memory(), model={"name": loaded.name, "path": loaded.path, "kind": loaded.kind},
                evaluation=evaluation or None,
                extra={**outcome.details, **extra, "checkpoint": checkpoint,
                       "placement": placement_report(loaded.placement, meter, save_copies_peak)},
            )
            write_report(os.path.join(staging, "pruning_report.json"), report)
    return report


SMALL_MODEL_PARAMETERS = 100_000_000


def set_cpu_threads(model: nn.Module, threads: int | None = None, device: str | None = None) -> int:
    """Set torch's CPU threads: `threads` when given, else 1 for a model under 100M parameters on
    the CPU. Tiny models run fastest on one thread: every op is too small to split, and on a busy
    machine OpenMP barriers between threads cost more than the op itself. Returns the count in use."""
    if threads is not None and threads < 1:
        raise UserInputError(f"--threads must be at least 1, got {threads}")
    device = device or next(model.parameters()).device.type
    if threads is None and device == "cpu" and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS:
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def add_eval_arguments(parser: argparse.ArgumentParser, data_help: str, folder_flag: str) -> None:
    """--eval/--no_eval, --eval_data_path, --eval_<folder_flag>, --eval_samples of the prune CLIs."""
    ev = parser.add_argument_group("evaluation after pruning")
    ev.add_argument("--eval", dest="eval", action="store_true", default=None,
                    help="evaluate dense and pruned accuracy (default: on for the embedded model only)")
    ev.add_argument("--no_eval", dest="eval", action="store_false")
    ev.add_argument("--eval_data_path", default=None, help=f"{data_help} (default: the embedded eval split)")
    ev.add_argument(f"--eval_{folder_flag}", default=None)
    ev.add_argument("--eval_samples", type=int, default=None, help="evaluate the first N records only")
    add_realtext_argument(ev)  # dense and pruned, with or without --eval


def check_eval_samples(args: argparse.Namespace) -> None:
    if args.eval_samples is not None and args.eval_samples < 1:
        raise UserInputError(f"--eval_samples must be at least 1, got {args.eval_samples}")


def check_eval_limits(args: argparse.Namespace) -> None:
    """--max_samples and --max_new_tokens of the evaluation CLIs."""
    if args.max_samples is not None and args.max_samples < 1:
        raise UserInputError(f"--max_samples must be at least 1, got {args.max_samples}")
    if args.max_new_tokens < 1:
        raise UserInputError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")


def run_summary(report: dict, cfg: PruneConfig, output_dir: str) -> dict:
    """The one JSON line a prune CLI prints; with evaluation, also dense -> pruned on stderr."""
    summary = {"output_dir": output_dir, "method": cfg.name, "target_sparsity": cfg.sparsity,
               "sparsity_type": str(cfg.pattern), "achieved_sparsity": report["achieved_sparsity"],
               "tokens_per_modality": report["calibration"].get("tokens_per_modality")}
    if "evaluation" in report:
        dense, pruned = report["evaluation"]["dense"], report["evaluation"]["pruned"]
        summary["dense_accuracy"], summary["pruned_accuracy"] = dense["accuracy"], pruned["accuracy"]
        summary["dense_answer_perplexity"] = dense["answer_perplexity"]
        summary["pruned_answer_perplexity"] = pruned["answer_perplexity"]
        if pruned.get("per_kind"):
            summary["pruned_accuracy_per_kind"] = {k: v["accuracy"] for k, v in pruned["per_kind"].items()}
        sys.stderr.write(f"\naccuracy dense {dense['accuracy']:.3f} -> pruned {pruned['accuracy']:.3f}; "
                         f"answer perplexity {dense['answer_perplexity']:.3f} -> {pruned['answer_perplexity']:.3f}\n")
    if "realtext" in report:
        dense, pruned = report["realtext"]["dense"], report["realtext"]["pruned"]
        summary["dense_realtext_perplexity"] = dense["perplexity"]
        summary["pruned_realtext_perplexity"] = pruned["perplexity"]
        shown = [f"{r['perplexity']:.3f}" if r["perplexity"] is not None else "n/a" for r in (dense, pruned)]
        sys.stderr.write(f"real-text perplexity dense {shown[0]} -> pruned {shown[1]} ({pruned['tokens']} tokens of "
                         f"Python standard library English, sha256 {pruned['sha256'][:12]})\n")
    return summary


