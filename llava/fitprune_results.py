"""Regenerate the "fitprune" section of docs/results.md on the embedded LLaVA-NeXT (minutes):

    python -m llava.fitprune_results            # or: make fitprune-results

The model is the embedded default (SmolLM2; EMBEDDED_MODEL=tiny: the tiny model, written to the
section "fitprune-tiny" and fitprune_results_tiny.json). For the dense embedded checkpoint and a TAMP 0.5 copy of it (made with scripts/prune/tamp.sh into a
temporary folder unless --tamp_model names one): recipe search at each budget (time, α, analytic
FLOPs reduction), accuracy and answer perplexity on the embedded eval split, and the measured prefill
time of dense vs recipe, timed in one process, alternating, median over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from llava import fitprune as lfp
from llava.data import encode_record, load_records, model_inputs, select_task
from llava.embedded import paths
from llava.eval import evaluate, load_model
from llava.model import decoder_layers
from mmprune.cli import run_main
from mmprune.output import check_output_location, write_json_file
from mmprune.report import update_markdown_section

SECTION = "fitprune"


def build_tamp(folder: str, model_path) -> None:
    env = dict(os.environ, OUTPUT_DIR=folder, OVERWRITE="1", OMP_NUM_THREADS="1", MODEL_PATH=str(model_path))
    subprocess.run(["bash", "scripts/prune/tamp.sh", "0.5", "--no_eval"], cwd=paths.REPO_ROOT, env=env,
                   check=True, stdout=subprocess.DEVNULL)


class PrefillClock:
    """CPU time (this thread) and wall time of whole forwards and of the decoder part inside them."""

    def __init__(self, model):
        _, layers = decoder_layers(model)
        self.marks = {}
        self.hooks = [
            layers[0].register_forward_pre_hook(lambda *a: self.marks.update(a=(time.thread_time(), time.perf_counter()))),
            model.model.language_model.norm.register_forward_hook(
                lambda *a: self.marks.update(b=(time.thread_time(), time.perf_counter()))),
        ]

    @torch.no_grad()
    def run(self, model, prompts) -> dict:
        totals = dict.fromkeys(("cpu", "wall", "decoder_cpu", "decoder_wall"), 0.0)
        for inputs in prompts:
            cpu, wall = time.thread_time(), time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            totals["cpu"] += time.thread_time() - cpu
            totals["wall"] += time.perf_counter() - wall
            totals["decoder_cpu"] += self.marks["b"][0] - self.marks["a"][0]
            totals["decoder_wall"] += self.marks["b"][1] - self.marks["a"][1]
        return {k: 1000 * v / len(prompts) for k, v in totals.items()}  # ms per prompt

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def time_prefill(model, processor, recipes: dict, prompts_records, repeats: int) -> dict:
    """Median ms per prompt for dense (None) and each recipe, runs alternating within every repeat."""
    prompts = [model_inputs(encode_record(processor, r, paths.EVAL_IMAGE_FOLDER, with_answer=False,
                                          add_generation_prompt=True)) for r in prompts_records]
    clock = PrefillClock(model)
    runs = {name: [] for name in recipes}
    try:
        for name, recipe in recipes.items():  # warm-up
            with lfp.apply_token_recipe(model, recipe) if recipe else _null():
                clock.run(model, prompts[:2])
        for _ in range(repeats):
            for name, recipe in recipes.items():
                with lfp.apply_token_recipe(model, recipe) if recipe else _null():
                    runs[name].append(clock.run(model, prompts))
    finally:
        clock.remove()
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def measure_model(label, model_path, args, calibration, eval_records, timing_records) -> dict:
    model, processor = load_model(model_path, "cpu")
    torch.set_num_threads(1)
    out = {"model": label, "model_path": paths.shown(model_path), "recipes": {}}
    recipes = {"dense": None}
    for budget in args.budgets:
        began = time.perf_counter()
        recipe = lfp.search(model, processor, calibration, paths.IMAGE_FOLDER, budget, progress=False)
        seconds = time.perf_counter() - began
        recipes[f"{budget:g}"] = recipe
        out["recipes"][f"{budget:g}"] = {"search_seconds": round(seconds, 2), "alpha": recipe.meta["alpha"],
                                         "keep_fraction": [round(f, 4) for f in recipe.keep_fraction],
                                         "flops_reduction": recipe.meta["flops_reduction"]}
    out["eval"] = {name: evaluate(model, processor, eval_records, paths.EVAL_IMAGE_FOLDER, progress=False,
                                  token_recipe=recipe) for name, recipe in recipes.items()}
    out["timing_ms_per_prompt"] = time_prefill(model, processor, recipes, timing_records, args.repeats)
    return out


@torch.no_grad()
def time_decoder_prefill(decoder, recipe, dims, n_visual: int, n_text: int, repeats: int, start: int = 8) -> dict:
    """Prefill CPU time (1 thread, median, dense and recipe alternating) of a Llama decoder stack on
    `start` text + n_visual visual + n_text text positions of random embeddings (time does not depend
    on the values), with the analytic FLOPs cut of the recipe."""
    from mmprune import fitprune as core

    torch.manual_seed(0)
    embeds = torch.randn(1, start + n_visual + n_text, decoder.config.hidden_size)
    visual = torch.zeros(1, embeds.shape[1], dtype=torch.bool)
    visual[0, start:start + n_visual] = True
    times = {"dense": [], "recipe": []}
    for _ in range(repeats + 1):  # the first round warms up
        for name in times:
            handle = core.apply_token_recipe(decoder, decoder.layers, recipe, lambda a, k: visual) \
                if name == "recipe" else None
            cpu = time.thread_time()
            decoder(inputs_embeds=embeds, use_cache=True)
            times[name].append(1000 * (time.thread_time() - cpu))
            if handle:
                handle.remove()
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"keep_fraction": list(recipe.keep_fraction), "n_visual": n_visual, "n_text": n_text + start,
            "flops_reduction_visual": core.flops_reduction(n_visual, recipe.drops(n_visual), dims),
            "flops_reduction_all": core.flops_reduction(n_visual, recipe.drops(n_visual), dims, n_text + start),
            "dense_ms": med["dense"], "recipe_ms": med["recipe"]}


def scaled_timing(recipe, repeats: int, n_visual: int = 576, n_text: int = 64) -> dict:
    """Width check for the tiny model: a random-weight Llama decoder of a less tiny width (d 512,
    MLP 1408, 8 layers, 8 query / 2 KV heads), `recipe` stretched to 8 layers (each fraction used
    for two layers): where matmuls, not per-op overhead, dominate."""
    from transformers import LlamaConfig, LlamaModel

    from mmprune import fitprune as core

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=64, vocab_size=32, max_position_embeddings=4096)
    stretched = core.TokenRecipe([f for f in recipe.keep_fraction for _ in range(2)])
    return time_decoder_prefill(LlamaModel(config).eval(), stretched, core.DecoderDims.from_config(config),
                                n_visual, n_text, repeats)


def length_check(model_path, recipe, prompts_records, repeats: int, n_visual: int = 576, n_text: int = 64) -> dict:
    """The model's own decoder and recipe on a prompt as long as a real LLaVA-NeXT's base view (576
    visual tokens): whether the FLOPs cut becomes time once the prompt is long enough."""
    from mmprune import fitprune as core

    model, processor = load_model(model_path, "cpu")
    lengths = [encode_record(processor, r, paths.EVAL_IMAGE_FOLDER, with_answer=False,
                             add_generation_prompt=True)["input_ids"].shape[1] for r in prompts_records]
    decoder = model.model.language_model
    out = time_decoder_prefill(decoder.eval(), recipe, core.DecoderDims.from_config(decoder.config),
                               n_visual, n_text, repeats)
    return {**out, "embedded_prompt_tokens": statistics.mean(lengths)}


def _pct(x):
    return f"{100 * x:.1f}"


def markdown(results: list, args, elapsed: float, scaled: dict | None = None, load: tuple = ()) -> str:
    lines = [
        f"## FitPrune (visual-token pruning to a FLOPs budget) on {paths.model_title(args.model_path)}",
        "",
        f"Generated by `python -m llava.fitprune_results` ({elapsed / 60:.1f} min). Recipes searched on "
        f"{args.nsamples} `sharegpt4v` calibration records (seed 42, full conversations), tolerance 0.01 "
        f"(7 bisection steps); accuracy on {results[0]['eval']['dense']['n']} embedded eval records (greedy exact "
        "match; with a recipe the prompt is prefilled alone, then the answer runs on the cache). FLOPs: "
        "analytic decoder multiply-accumulates (attention with QKᵀ/AV and GQA, o_proj, gated MLP), mean over "
        "the calibration prompts, *visual* = visual tokens only (the reference's accounting), *all* = text "
        "tokens counted too. Prefill: one forward of the prompt (vision tower + decoder, KV cache, last "
        f"logits only), ms per prompt on {args.timing_prompts} eval prompts, CPU time of the thread "
        f"(1 thread), median of {args.repeats} repeats, dense and recipes alternating in one process; "
        "*decoder* = the decoder layers inside it. CPU time is reported because wall time also counts "
        "waiting for a core when other jobs run"
        + (f" (1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end, {os.cpu_count()} "
           "cores)." if load else "."),
        "",
        "| model | budget | FLOPs cut visual % | FLOPs cut all % | α | search s | keep after each layer | "
        "accuracy | Δ acc (pts) | answer ppl | prefill ms | Δ prefill % | decoder ms | Δ decoder % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        base_eval, base_time = res["eval"]["dense"], res["timing_ms_per_prompt"]["dense"]
        for name in ["dense"] + list(res["recipes"]):
            ev, tm = res["eval"][name], res["timing_ms_per_prompt"][name]
            rec = res["recipes"].get(name)
            flops = rec["flops_reduction"] if rec else None
            lines.append("| " + " | ".join([
                res["model"], "-" if rec is None else name,
                "0" if rec is None else _pct(flops["visual_only"]),
                "0" if rec is None else _pct(flops["with_text"]),
                "-" if rec is None else f"{rec['alpha']:.4f}",
                "-" if rec is None else f"{rec['search_seconds']:.1f}",
                "-" if rec is None else ", ".join(f"{f:.2f}" for f in rec["keep_fraction"]),
                f"{ev['accuracy']:.3f}",
                "-" if rec is None else f"{100 * (ev['accuracy'] - base_eval['accuracy']):+.1f}",
                f"{ev['answer_perplexity']:.3f}",
                f"{tm['cpu']:.2f}", "-" if rec is None else f"{100 * (tm['cpu'] / base_time['cpu'] - 1):+.1f}",
                f"{tm['decoder_cpu']:.2f}",
                "-" if rec is None else f"{100 * (tm['decoder_cpu'] / base_time['decoder_cpu'] - 1):+.1f}",
            ]) + " |")
    lines += ["", "Wall-clock medians (ms per prompt, same runs): " + "; ".join(
        f"{res['model']} {name} {tm['wall']:.2f} (decoder {tm['decoder_wall']:.2f})"
        for res in results for name, tm in res["timing_ms_per_prompt"].items()) + ".", ""]
    if scaled and scaled.get("kind") == "length":
        lines += [
            f"Length check (the embedded prompts have {scaled['embedded_prompt_tokens']:.0f} tokens on average: "
            f"the dense decoder's prefill takes {results[0]['timing_ms_per_prompt']['dense']['decoder_cpu']:.0f} ms "
            f"for them and {scaled['dense_ms']:.0f} ms for {scaled['n_visual'] + scaled['n_text']} positions, so part "
            "of a prompt's time (reading every weight matrix once, per-operation overhead) does not scale with "
            "the token count, and dropping tokens saves less time than FLOPs, the less so the shorter the prompt): "
            "the same dense decoder and its own 0.5 recipe on "
            f"{scaled['n_visual']} visual + {scaled['n_text']} text positions (LLaVA-NeXT's base view is 576 "
            f"visual tokens; FLOPs cut {_pct(scaled['flops_reduction_visual'])} % visual / "
            f"{_pct(scaled['flops_reduction_all'])} % all): decoder prefill {scaled['dense_ms']:.0f} ms dense -> "
            f"{scaled['recipe_ms']:.0f} ms ({100 * (scaled['recipe_ms'] / scaled['dense_ms'] - 1):+.1f} %), CPU "
            f"time, 1 thread, median of {args.repeats}, alternating.", ""]
    elif scaled:
        lines += [
            "Width check (the embedded decoder is d = 128: its matmuls cost about the same for all or a third "
            "of its visual tokens, so per-op overhead, not FLOPs, sets its prefill time): a random-weight Llama decoder with d 512, "
            "MLP 1408, 8 layers, GQA 8/2 heads, on 576 visual + 72 text tokens, with the dense model's 0.5 "
            f"recipe stretched to 8 layers (keep {', '.join(f'{f:.2f}' for f in scaled['keep_fraction'])}; "
            f"FLOPs cut {_pct(scaled['flops_reduction_visual'])} % visual / {_pct(scaled['flops_reduction_all'])} % "
            f"all): decoder prefill {scaled['dense_ms']:.0f} ms dense -> {scaled['recipe_ms']:.0f} ms "
            f"({100 * (scaled['recipe_ms'] / scaled['dense_ms'] - 1):+.1f} %), CPU time, 1 thread, median of "
            f"{args.repeats}, alternating.", ""]
    return "\n".join(lines)


def _recipe_of(result: dict, budget: float):
    from mmprune.fitprune import TokenRecipe

    return TokenRecipe(result["recipes"][f"{budget:g}"]["keep_fraction"])


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m llava.fitprune_results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--nsamples", type=int, default=lfp.DEFAULT_NSAMPLES)
    parser.add_argument("--eval_samples", type=int, default=None, help="default: the whole eval split")
    parser.add_argument("--timing_prompts", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tamp_model", default=None, help="reuse a TAMP 0.5 checkpoint (default: build one)")
    parser.add_argument("--markdown", default=str(paths.REPO_ROOT / "docs" / "results.md"))
    parser.add_argument("--json", default=None, help="default docs/fitprune_results.json (tiny: _tiny.json)")
    parser.add_argument("--width_check", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the 0.5 recipe at real LLaVA-NeXT prompt length (576 visual tokens): the "
                             "tiny model's on a random-weight d 512 decoder, another model's on its own decoder "
                             "(default on)")
    parser.add_argument("--reuse", action="store_true",
                        help="take the model measurements from --json (an earlier run) and only run the check")
    args = parser.parse_args(argv)
    args.model_path = paths.default_checkpoint()
    suffix = paths.results_suffix(args.model_path)
    args.json = args.json or str(paths.REPO_ROOT / "docs" / f"fitprune_results{suffix}.json")
    args.section = SECTION + suffix.replace("_", "-")
    if args.width_check is None:
        args.width_check = True
    return args


def measure_all(args) -> list:
    calibration = select_task(load_records(paths.DATA_PATH), paths.TASK_SPLIT_PATH, paths.CALIBRATION_TASK,
                              args.nsamples, 42)
    eval_records = load_records(paths.EVAL_DATA_PATH)[:args.eval_samples]
    timing_records = eval_records[:args.timing_prompts]
    results = [measure_model("dense", args.model_path, args, calibration, eval_records, timing_records)]
    with tempfile.TemporaryDirectory(prefix="fitprune-tamp-") as tmp:
        tamp = args.tamp_model
        if tamp is None:
            tamp = os.path.join(tmp, "tamp-0.5")
            sys.stderr.write(f"building TAMP 0.5 with scripts/prune/tamp.sh into {tamp}\n")
            build_tamp(tamp, args.model_path)
        results.append(measure_model("TAMP 0.5", tamp, args, calibration, eval_records, timing_records))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    # before the measurements: neither output overwrites or lands inside an input, and both can be created
    inputs = [args.model_path, paths.DATA_ROOT, args.tamp_model]
    check_output_location(args.markdown, inputs, "--markdown")
    check_output_location(args.json, inputs, "--json")
    began = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(1)
    if args.reuse:
        with open(args.json, encoding="utf-8") as f:
            saved = json.load(f)
        results = saved["results"]
    else:
        results = measure_all(args)
    scaled = None
    if args.width_check and 0.5 in args.budgets:
        recipe = lfp.as_recipe(_recipe_of(results[0], 0.5))
        if paths.is_tiny(args.model_path):
            scaled = {"kind": "width", **scaled_timing(recipe, args.repeats)}
        else:
            timing_records = load_records(paths.EVAL_DATA_PATH)[:args.timing_prompts]
            scaled = {"kind": "length", **length_check(args.model_path, recipe, timing_records, args.repeats)}
    elapsed = time.perf_counter() - began
    load = (load_start, os.getloadavg()[0])
    if args.reuse:  # the models were measured by the earlier run: its time and load stand
        elapsed += 60 * saved["minutes"]
        load = (saved["load_average_1min"]["start"], saved["load_average_1min"]["end"])
    body = markdown(results, args, elapsed, scaled, load)
    update_markdown_section(args.markdown, args.section, body)
    write_json_file(args.json, {"results": results, "width_check": scaled, "minutes": round(elapsed / 60, 2),
                                "load_average_1min": {"start": load[0], "end": load[1], "cores": os.cpu_count()}})
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
