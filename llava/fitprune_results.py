"""Regenerate the "fitprune" section of docs/results.md on the embedded LLaVA-NeXT (minutes):

    python -m llava.fitprune_results            # or: make fitprune-results

The model is the embedded default (SmolLM2; EMBEDDED_MODEL=tiny: the tiny model, written to the
section "fitprune-tiny" and fitprune_results_tiny.json). For the dense embedded checkpoint and a TAMP 0.5 copy of it (made with scripts/prune/tamp.sh into a
temporary folder unless --tamp_model names one): recipe search at each budget (time, α, analytic
FLOPs reduction), accuracy and answer perplexity on the embedded eval split, and the measured prefill
time of dense vs recipe (one process, settings alternating prompt by prompt, median over repeats, in
--timing_rounds rounds), with a breakdown of where the time goes and a check at real prompt length.

--retime measures the timing again on an earlier run's recipes and accuracies (--json); --render
rewrites the section from --json alone.
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
from collections import defaultdict

import torch
from torch import nn
from tqdm import tqdm

from llava import fitprune as lfp
from llava.data import encode_record, load_records, model_inputs, select_task
from llava.embedded import paths
from llava.eval import evaluate
from llava.convert import load_model
from llava.model import decoder_layers
from mmprune.base.entry import run_main
from mmprune.base.errors import UserInputError
from mmprune.base.output import check_output_location, write_json_file
from mmprune.run.report import update_markdown_section

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


def encode_prompts(processor, records) -> list:
    return [model_inputs(encode_record(processor, r, paths.EVAL_IMAGE_FOLDER, with_answer=False,
                                       add_generation_prompt=True)) for r in records]


def time_prefill(model, processor, recipes: dict, prompts_records, repeats: int) -> dict:
    """Median over repeats of ms per prompt for dense (None) and each recipe. Runs alternate prompt by
    prompt (each prompt runs under every setting back to back, the first setting rotating), so a
    change of machine speed during a repeat falls on all settings alike."""
    prompts = encode_prompts(processor, prompts_records)
    clock = PrefillClock(model)
    names = list(recipes)
    runs = {name: [] for name in names}
    try:
        for name, recipe in recipes.items():  # warm-up
            with lfp.apply_token_recipe(model, recipe) if recipe else _null():
                clock.run(model, prompts[:2])
        for repeat in range(repeats):
            totals = {name: [] for name in names}
            for index, inputs in enumerate(prompts):
                shift = (repeat + index) % len(names)
                for name in names[shift:] + names[:shift]:
                    with lfp.apply_token_recipe(model, recipes[name]) if recipes[name] else _null():
                        totals[name].append(clock.run(model, [inputs]))
            for name, per_prompt in totals.items():
                runs[name].append({k: statistics.fmean(t[k] for t in per_prompt) for k in per_prompt[0]})
    finally:
        clock.remove()
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def time_prefill_rounds(model, processor, recipes: dict, prompts_records, repeats: int, rounds: int) -> dict:
    """time_prefill `rounds` times (each round a median of `repeats` alternating runs): the median of
    the round medians, and every round's own (the spread shows what one run of the table can say)."""
    per_round = [time_prefill(model, processor, recipes, prompts_records, repeats)
                 for _ in tqdm(range(rounds), desc="timing rounds", leave=False, disable=rounds == 1)]
    median = {name: {k: statistics.median(r[name][k] for r in per_round) for k in per_round[0][name]}
              for name in recipes}
    return {"median": median, "rounds": per_round}


class LinearClock:
    """CPU time (this thread) and rows of the nn.Linear modules inside `layers`, summed per module
    name (q_proj, ..., down_proj) over layers and calls."""

    def __init__(self, layers: nn.ModuleList):
        self.ms = defaultdict(float)
        self.rows = defaultdict(int)
        self._began = 0.0
        self.hooks = []
        for layer in layers:
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear):
                    short = name.rsplit(".", 1)[-1]
                    self.hooks.append(module.register_forward_pre_hook(self._start))
                    self.hooks.append(module.register_forward_hook(
                        lambda m, args, out, short=short: self._stop(short, args[0])))

    def _start(self, module, args):
        self._began = time.thread_time()

    def _stop(self, name: str, x: torch.Tensor):
        self.ms[name] += 1000 * (time.thread_time() - self._began)
        self.rows[name] += x.numel() // x.shape[-1]

    def take(self) -> dict:
        out = {name: {"ms": self.ms[name], "rows": self.rows[name]} for name in self.ms}
        self.ms.clear()
        self.rows.clear()
        return out

    def remove(self):
        for hook in self.hooks:
            hook.remove()


@torch.no_grad()
def linear_breakdown(model, processor, recipe, prompts_records, repeats: int) -> dict:
    """Where prefill time goes, dense vs `recipe` (alternating, median of repeats): rows and CPU time
    of each decoder linear kind per prompt, the whole decoder's CPU time, and the decoder's time for
    a one-position input (what a forward costs regardless of the token count: reading every weight
    matrix once, per-operation overhead)."""
    prompts = encode_prompts(processor, prompts_records)
    _, layers = decoder_layers(model)
    decoder = model.model.language_model
    one = torch.zeros(1, 1, decoder.config.hidden_size, dtype=next(decoder.parameters()).dtype)
    prefill, linears = PrefillClock(model), LinearClock(layers)
    runs = {"dense": [], "recipe": []}
    one_token = []
    try:
        for round_index in range(repeats + 1):  # the first round warms up
            for name in runs:
                with lfp.apply_token_recipe(model, recipe) if name == "recipe" else _null():
                    linears.take()
                    decoder_ms = prefill.run(model, prompts)["decoder_cpu"]
                    taken = linears.take()
                if round_index:
                    runs[name].append({"decoder_ms": decoder_ms,
                                       **{k: {"ms": v["ms"] / len(prompts), "rows": v["rows"] / len(prompts)}
                                          for k, v in taken.items()}})
            cpu = time.thread_time()
            decoder(inputs_embeds=one, use_cache=True)
            if round_index:
                one_token.append(1000 * (time.thread_time() - cpu))
    finally:
        prefill.remove()
        linears.remove()
    out = {"one_token_decoder_ms": statistics.median(one_token), "prompts": len(prompts)}
    for name, rs in runs.items():
        kinds = [k for k in rs[0] if k != "decoder_ms"]
        out[name] = {"decoder_ms": statistics.median(r["decoder_ms"] for r in rs),
                     "linears": {k: {"ms": statistics.median(r[k]["ms"] for r in rs), "rows": rs[0][k]["rows"]}
                                 for k in kinds}}
    return out


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
    out.update(measure_timing(model, processor, recipes, timing_records, args, breakdown=label == "dense"))
    return out


def measure_timing(model, processor, recipes: dict, timing_records, args, breakdown: bool) -> dict:
    """Prefill timing in rounds and, with `breakdown`, the linear-layer breakdown of the 0.5 recipe."""
    timed = time_prefill_rounds(model, processor, recipes, timing_records, args.repeats, args.timing_rounds)
    out = {"timing_ms_per_prompt": timed["median"], "timing_rounds": timed["rounds"]}
    if breakdown and "0.5" in recipes and args.breakdown:
        out["linear_breakdown"] = linear_breakdown(model, processor, recipes["0.5"], timing_records, args.repeats)
    return out


@torch.no_grad()
def time_decoder_prefill(decoder, recipe, dims, n_visual: int, n_text: int, repeats: int, start: int = 8) -> dict:
    """Prefill CPU time (1 thread, median, dense and recipe alternating) of a Llama decoder stack on
    `start` text + n_visual visual + n_text text positions of random embeddings (time does not depend
    on the values), with the analytic FLOPs cut of the recipe."""
    from mmprune.tokens import fitprune as core

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

    from mmprune.tokens import fitprune as core

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=64, vocab_size=32, max_position_embeddings=4096)
    stretched = core.TokenRecipe([f for f in recipe.keep_fraction for _ in range(2)])
    return time_decoder_prefill(LlamaModel(config).eval(), stretched, core.DecoderDims.from_config(config),
                                n_visual, n_text, repeats)


def length_check(model_path, recipe, prompts_records, repeats: int, n_visual: int = 576, n_text: int = 64) -> dict:
    """The model's own decoder and recipe on a prompt as long as a real LLaVA-NeXT's base view (576
    visual tokens): whether the FLOPs cut becomes time once the prompt is long enough."""
    from mmprune.tokens import fitprune as core

    model, processor = load_model(model_path, "cpu")
    lengths = [encode_record(processor, r, paths.EVAL_IMAGE_FOLDER, with_answer=False,
                             add_generation_prompt=True)["input_ids"].shape[1] for r in prompts_records]
    decoder = model.model.language_model
    out = time_decoder_prefill(decoder.eval(), recipe, core.DecoderDims.from_config(decoder.config),
                               n_visual, n_text, repeats)
    return {**out, "embedded_prompt_tokens": statistics.mean(lengths)}


def _pct(x):
    return f"{100 * x:.1f}"


def _change(new: float, old: float) -> str:
    return f"{100 * (new / old - 1):+.1f}"


def round_spread(results: list, repeats: int) -> str:
    """Every timing round's change of decoder prefill CPU time, per model and budget."""
    parts = []
    for res in results:
        rounds = res["timing_rounds"]
        for name in res["recipes"]:
            parts.append(f"{res['model']} {name}: " + ", ".join(
                _change(r[name]["decoder_cpu"], r["dense"]["decoder_cpu"]) for r in rounds))
    return (f"Timing rounds ({len(results[0]['timing_rounds'])} rounds, each a median of {repeats} repeats; the "
            "table shows the median of the round medians): Δ decoder prefill % in each round: "
            + "; ".join(parts) + ".")


def breakdown_text(b: dict, model: str, repeats: int) -> str:
    """Why the time cut is smaller than the FLOPs cut, from linear_breakdown's measurements."""
    dense, pruned = b["dense"], b["recipe"]
    kinds = list(dense["linears"])
    rows_dense = sum(dense["linears"][k]["rows"] for k in kinds)
    rows_pruned = sum(pruned["linears"][k]["rows"] for k in kinds)
    ms_dense = sum(dense["linears"][k]["ms"] for k in kinds)
    ms_pruned = sum(pruned["linears"][k]["ms"] for k in kinds)
    rest_dense, rest_pruned = dense["decoder_ms"] - ms_dense, pruned["decoder_ms"] - ms_pruned
    return (
        f"Where the time goes ({model} model, budget 0.5, {b['prompts']} prompts, CPU time with a clock around "
        f"every decoder linear, median of {repeats} alternating repeats): rows through the decoder's linear "
        f"layers {_change(rows_pruned, rows_dense)} %, their time {_change(ms_pruned, ms_dense)} % "
        f"({ms_dense:.1f} -> {ms_pruned:.1f} ms per prompt; "
        + ", ".join(f"{k} {_change(pruned['linears'][k]['ms'], dense['linears'][k]['ms'])}" for k in kinds)
        + f"); the rest of the decoder (attention kernel, norms, RoPE, residuals, and the token selection "
        f"itself) {rest_dense:.1f} -> {rest_pruned:.1f} ms ({_change(rest_pruned, rest_dense)} %); the whole "
        f"decoder {dense['decoder_ms']:.1f} -> {pruned['decoder_ms']:.1f} ms ({_change(pruned['decoder_ms'], dense['decoder_ms'])} %). "
        f"A forward of one position through the decoder takes {b['one_token_decoder_ms']:.1f} ms, "
        f"{_pct(b['one_token_decoder_ms'] / dense['decoder_ms'])} % of a dense prompt's: the part that "
        "does not shrink with the token count (every weight matrix is read once per forward, every operation "
        "has its fixed overhead).")


def markdown(results: list, args, elapsed: float, scaled: dict | None = None, load: tuple = ()) -> str:
    rounds = len(results[0].get("timing_rounds", [None]))
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
        "(1 thread), one process; each prompt runs under every setting back to back (the first setting "
        f"rotating), mean over the prompts, median of {args.repeats} repeats"
        + (f", median of {rounds} such rounds" if rounds > 1 else "")
        + "; *decoder* = the decoder layers inside it. CPU time is reported because wall time also counts "
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
    if any(len(res.get("timing_rounds", [])) > 1 for res in results):
        lines += [round_spread(results, args.repeats), ""]
    breakdown = results[0].get("linear_breakdown")
    if breakdown:
        lines += [breakdown_text(breakdown, results[0]["model"], args.repeats), ""]
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
    from mmprune.tokens.fitprune import TokenRecipe

    return TokenRecipe(result["recipes"][f"{budget:g}"]["keep_fraction"])


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m llava.fitprune_results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--nsamples", type=int, default=lfp.DEFAULT_NSAMPLES)
    parser.add_argument("--eval_samples", type=int, default=None, help="default: the whole eval split")
    parser.add_argument("--timing_prompts", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per timing round (median)")
    parser.add_argument("--timing_rounds", type=int, default=3,
                        help="independent timing rounds; the table shows the median of their medians, the text "
                             "every round's change (default %(default)s)")
    parser.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each decoder linear kind, dense vs the 0.5 recipe (default on)")
    parser.add_argument("--tamp_model", default=None, help="reuse a TAMP 0.5 checkpoint (default: build one)")
    parser.add_argument("--markdown", default=str(paths.REPO_ROOT / "docs" / "results.md"))
    parser.add_argument("--json", default=None, help="default docs/fitprune_results.json (tiny: _tiny.json)")
    parser.add_argument("--width_check", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the 0.5 recipe at real LLaVA-NeXT prompt length (576 visual tokens): the "
                             "tiny model's on a random-weight d 512 decoder, another model's on its own decoder "
                             "(default on)")
    parser.add_argument("--reuse", action="store_true",
                        help="take the model measurements from --json (an earlier run) and only run the check")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the section from --json (an earlier run) without measuring anything")
    parser.add_argument("--retime", action="store_true",
                        help="take the recipes and accuracies from --json (an earlier run) and measure the timing "
                             "again (rounds, breakdown, check); the TAMP model is rebuilt unless --tamp_model names it")
    args = parser.parse_args(argv)
    if args.reuse + args.retime + args.render > 1:
        parser.error("--reuse, --retime and --render each take an earlier run differently: give one of them")
    for flag in ("repeats", "timing_rounds", "timing_prompts"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be 1 or more")
    args.model_path = paths.default_checkpoint()
    suffix = paths.results_suffix(args.model_path)
    args.json = args.json or str(paths.REPO_ROOT / "docs" / f"fitprune_results{suffix}.json")
    args.section = SECTION + suffix.replace("_", "-")
    if args.width_check is None:
        args.width_check = True
    return args


def measure_all(args, saved: list | None = None) -> list:
    """Both models' measurements; with `saved` (an earlier run's results) only the timing is new."""
    eval_records = load_records(paths.EVAL_DATA_PATH)[:args.eval_samples]
    timing_records = eval_records[:args.timing_prompts]
    if saved is None:
        calibration = select_task(load_records(paths.DATA_PATH), paths.TASK_SPLIT_PATH, paths.CALIBRATION_TASK,
                                  args.nsamples, 42)

    def measure(index: int, label: str, model_path) -> dict:
        if saved is None:
            return measure_model(label, model_path, args, calibration, eval_records, timing_records)
        earlier = saved[index]
        model, processor = load_model(model_path, "cpu")
        recipes = {"dense": None, **{name: _recipe_of(earlier, float(name)) for name in earlier["recipes"]}}
        return {**earlier, **measure_timing(model, processor, recipes, timing_records, args, breakdown=index == 0)}

    results = [measure(0, "dense", args.model_path)]
    with tempfile.TemporaryDirectory(prefix="fitprune-tamp-") as tmp:
        tamp = args.tamp_model
        if tamp is None:
            tamp = os.path.join(tmp, "tamp-0.5")
            sys.stderr.write(f"building TAMP 0.5 with scripts/prune/tamp.sh into {tamp}\n")
            build_tamp(tamp, args.model_path)
        results.append(measure(1, "TAMP 0.5", tamp))
    return results


def read_saved(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserInputError(f"{path} does not exist: --reuse, --retime and --render read an earlier run's "
                             "measurements; run without them first (or name the file with --json)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


SETTINGS = ("nsamples", "timing_prompts", "repeats")  # stated by the section's text, saved in the JSON


def adopt_settings(args, saved: dict, names=SETTINGS) -> None:
    """Take the earlier run's settings for what the text reports from that run."""
    for name, value in saved.get("settings", {}).items():
        if name in names:
            setattr(args, name, value)


def saved_load(saved: dict) -> tuple:
    return saved["load_average_1min"]["start"], saved["load_average_1min"]["end"]


def render(args, saved: dict) -> int:
    """Rewrite the section from an earlier run's JSON, stating that run's own settings."""
    adopt_settings(args, saved)
    body = markdown(saved["results"], args, 60 * saved["minutes"], saved["width_check"], saved_load(saved))
    update_markdown_section(args.markdown, args.section, body)
    print(body)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    # before the measurements: neither output overwrites or lands inside an input, and both can be created
    inputs = [args.model_path, paths.DATA_ROOT, args.tamp_model]
    check_output_location(args.markdown, inputs, "--markdown")
    check_output_location(args.json, inputs, "--json")
    began = time.perf_counter()
    load_start = os.getloadavg()[0]
    torch.set_num_threads(1)
    saved = read_saved(args.json) if args.reuse or args.retime or args.render else None
    if args.render:
        return render(args, saved)
    if saved is not None:  # --reuse keeps all of the earlier run's measurements, --retime its searches
        adopt_settings(args, saved, SETTINGS if args.reuse else ("nsamples",))
    results = saved["results"] if args.reuse else measure_all(args, saved and saved["results"])
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
        load = saved_load(saved)
    elif args.retime:  # searches and evaluations are the earlier run's; the load is the new timing's
        elapsed += 60 * saved["minutes"]
    body = markdown(results, args, elapsed, scaled, load)
    update_markdown_section(args.markdown, args.section, body)
    settings = {name: getattr(args, name) for name in SETTINGS}
    write_json_file(args.json, {"results": results, "width_check": scaled, "settings": settings,
                                "minutes": round(elapsed / 60, 2),
                                "load_average_1min": {"start": load[0], "end": load[1], "cores": os.cpu_count()}})
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
