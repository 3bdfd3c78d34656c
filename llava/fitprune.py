"""FitPrune on LLaVA-NeXT: the recipe search entry point and the LLaVA-NeXT binding of the core's
token dropping (mmprune/tokens/ holds the algorithm).

    python -m llava.fitprune --budget 0.5 [--model_path DIR --data_path JSON --output FILE]

writes a token recipe (JSON: fraction of visual tokens kept after each decoder layer). Evaluate with
`python -m llava.eval --model_path DIR --token_recipe FILE`. In code:

    with apply_token_recipe(model, "recipe.json"):
        model(**inputs) / model.generate(**inputs)
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

from llava.data import IMAGE, encode_record, load_records, select_task
from llava.embedded import paths as embedded
from llava.model import capture_decoder_inputs, decoder_layers
from mmprune.tokens.flops import DecoderDims, flops_reduction, recipe_flops
from mmprune.tokens.hooks import TokenRecipeHandle, apply_token_recipe as apply_to_layers, visual_block
from mmprune.tokens.recipe import TokenRecipe, is_recipe_file, load_recipe, save_recipe
from mmprune.tokens.search import CalibSample, search_recipe
from mmprune.base.entry import OneLineErrorParser, run_main
from mmprune.run.checks import check_seed, resolve_device
from mmprune.base.errors import UserInputError
from mmprune.base.output import check_output_file

REAL_MODEL, REAL_DATA = embedded.REAL_MODEL, embedded.REAL_DATA
DEFAULT_NSAMPLES = 66  # the reference's ≈0.01 % slice of llava_v1_5_mix665k


def text_config(model):
    return getattr(model.config, "text_config", model.config)


def decoder_dims(model) -> DecoderDims:
    return DecoderDims.from_config(text_config(model))


def as_recipe(recipe) -> TokenRecipe:
    return recipe if isinstance(recipe, TokenRecipe) else load_recipe(recipe)


def apply_token_recipe(model, recipe, restore_length: bool = True) -> TokenRecipeHandle:
    """Make a LlavaNextForConditionalGeneration drop visual tokens as `recipe` (a TokenRecipe or a
    JSON path) says, in forward and generate, until handle.remove() (or the end of a `with`).

    Batch size 1; the prompt's visual tokens are its `image_token_id` positions (one image)."""
    image_id = model.config.image_token_id
    _, layers = decoder_layers(model)

    def visual_mask_of(args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        return None if input_ids is None else input_ids == image_id

    return apply_to_layers(model, layers, as_recipe(recipe), visual_mask_of, restore_length)


def calibration_samples(model, processor, records, image_folder, with_answer: bool = True) -> list:
    """Layer-0 inputs and the visual block of each record (records without an image are refused)."""
    encoded = [encode_record(processor, r, image_folder, with_answer=with_answer) for r in records]
    for record, enc in zip(records, encoded):
        if not bool((enc["modality_ids"] == IMAGE).any()):
            raise UserInputError(f"calibration record {record.get('id')!r} has no image; FitPrune "
                                 "calibrates on image prompts only")
    device = str(model.device)
    store = capture_decoder_inputs(model, iter(encoded), device, device, len(encoded))
    samples = []
    for hidden, kwargs, modality in zip(store.hidden, store.kwargs, store.modality_ids):
        start, count = visual_block((modality == IMAGE)[None])
        samples.append(CalibSample(hidden, kwargs, start, count))
    return samples


def token_counts(samples) -> list:
    """(n_visual, n_text after the visual block) per sample, for the FLOPs accounting."""
    return [(s.n_visual, s.hidden.shape[1] - s.n_visual) for s in samples]


def search(model, processor, records, image_folder, budget: float, tolerance: float = 0.01,
           progress: bool = True, meta: dict | None = None) -> TokenRecipe:
    """Calibrate on `records` and return the recipe with its metadata (FLOPs accounting included)."""
    began = time.perf_counter()
    samples = calibration_samples(model, processor, records, image_folder)
    dims = decoder_dims(model)
    _, layers = decoder_layers(model)
    result = search_recipe(layers, samples, dims, budget, tolerance, progress)
    recipe = result.recipe
    counts = token_counts(samples)
    n_ref = int(np.median([v for v, _ in counts]))
    recipe.meta.update({
        "method": "fitprune",
        "budget": budget,
        "alpha": result.alpha,
        "tolerance": tolerance,
        "n_ref": n_ref,
        "drop_counts_at_n_ref": recipe.drops(n_ref),
        "flops_reduction": {
            "accounting": "decoder multiply-accumulates (attention incl. QK^T/AV with GQA, o_proj, gated MLP); "
                          "visual_only counts visual tokens only (the reference's), with_text adds every "
                          "other prompt token",
            **{k: round(v, 6) for k, v in recipe_flops(recipe, dims, counts).items()},
            "at_n_ref_visual_only": round(flops_reduction(n_ref, recipe.drops(n_ref), dims), 6),
        },
        "decoder": dims.__dict__,
        "search_seconds": round(time.perf_counter() - began, 2),
        "bisection": result.trace,
        **(meta or {}),
    })
    return recipe


def parse_args(argv):
    parser = OneLineErrorParser(prog="python -m llava.fitprune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.5,
                        help="fraction of the visual tokens' decoder FLOPs to remove (default 0.5)")
    parser.add_argument("--model_path", default=None, help=f"llava-hf checkpoint (default {REAL_MODEL})")
    parser.add_argument("--data_path", default=None, help=f"LLaVA-NeXT raw-format JSON (default {REAL_DATA})")
    parser.add_argument("--image_folder", default=None, help="default: the JSON's folder")
    parser.add_argument("--task_split_path", default=None, help="task_split.json (default: beside the data JSON)")
    parser.add_argument("--task_name", default="sharegpt4v", help="calibration task")
    parser.add_argument("--nsamples", type=int, default=DEFAULT_NSAMPLES, help="calibration prompts (default %(default)s)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tolerance", type=float, default=0.01, help="bisection stops when the α interval is this narrow")
    parser.add_argument("--output", default=None,
                        help="recipe JSON (default checkpoints/<model>_fitprune_<budget>.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing recipe file")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for tiny models)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from mmprune.run.cli import set_cpu_threads
    from llava.convert.loading import load_model

    args = parse_args(argv)
    if not 0.0 < args.budget < 1.0:
        raise UserInputError(f"--budget {args.budget} must be in (0, 1), e.g. 0.5 for half the visual FLOPs")
    if not 0.0 < args.tolerance < 1.0:
        raise UserInputError(f"--tolerance {args.tolerance} must be in (0, 1)")
    check_seed(args.seed)
    args.device = resolve_device(args.device)
    embedded.resolve_model_and_data(args)
    name = os.path.basename(os.path.normpath(args.model_path))
    output = args.output or os.path.join("checkpoints", f"{name}_fitprune_{args.budget}.json")
    check_output_file(output, args.overwrite, [args.model_path, args.data_path, args.image_folder, args.task_split_path],
                      "--output / OUTPUT", is_recipe_file, "token recipe")
    records = select_task(load_records(args.data_path), args.task_split_path, args.task_name, args.nsamples, args.seed)
    torch.manual_seed(args.seed)
    model, processor = load_model(args.model_path, args.device)
    set_cpu_threads(model, args.threads)
    meta = {"model_path": args.model_path, "calibration": {
        "data_path": args.data_path, "task_name": args.task_name, "nsamples": len(records), "seed": args.seed,
        "sample_ids": [r.get("id") for r in records], "prompt": "full conversation (question and answer)"}}
    recipe = search(model, processor, records, args.image_folder, args.budget, args.tolerance, meta=meta)
    save_recipe(output, recipe)
    flops = recipe.meta["flops_reduction"]
    sys.stderr.write(f"\nrecipe {output}: keep {[round(f, 3) for f in recipe.keep_fraction]}, α {recipe.meta['alpha']:.4f}, "
                     f"FLOPs reduction {flops['visual_only']:.1%} (visual tokens) / {flops['with_text']:.1%} (all tokens), "
                     f"{recipe.meta['search_seconds']} s\n")
    print(json.dumps({"output": output, "budget": args.budget, "alpha": recipe.meta["alpha"],
                      "keep_fraction": recipe.keep_fraction, "flops_reduction": flops}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
