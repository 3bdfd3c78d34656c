"""Measurements behind the "fitprune" results section (llava.fitprune_results): recipe searches,
accuracy, prefill timing of dense vs recipe in alternating rounds, the per-linear breakdown, the
check at real prompt length, and the TAMP 0.5 copy they are repeated on."""

from __future__ import annotations

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
from llava.convert.loading import load_model
from llava.model import decoder_layers
from mmprune.tokens.flops import DecoderDims, flops_reduction
from mmprune.tokens.hooks import apply_token_recipe as apply_to_layers
from mmprune.tokens.recipe import TokenRecipe


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
    torch.manual_seed(0)
    embeds = torch.randn(1, start + n_visual + n_text, decoder.config.hidden_size)
    visual = torch.zeros(1, embeds.shape[1], dtype=torch.bool)
    visual[0, start:start + n_visual] = True
    times = {"dense": [], "recipe": []}
    for _ in range(repeats + 1):  # the first round warms up
        for name in times:
            handle = apply_to_layers(decoder, decoder.layers, recipe, lambda a, k: visual) \
                if name == "recipe" else None
            cpu = time.thread_time()
            decoder(inputs_embeds=embeds, use_cache=True)
            times[name].append(1000 * (time.thread_time() - cpu))
            if handle:
                handle.remove()
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {"keep_fraction": list(recipe.keep_fraction), "n_visual": n_visual, "n_text": n_text + start,
            "flops_reduction_visual": flops_reduction(n_visual, recipe.drops(n_visual), dims),
            "flops_reduction_all": flops_reduction(n_visual, recipe.drops(n_visual), dims, n_text + start),
            "dense_ms": med["dense"], "recipe_ms": med["recipe"]}


def scaled_timing(recipe, repeats: int, n_visual: int = 576, n_text: int = 64) -> dict:
    """Width check for the tiny model: a random-weight Llama decoder of a less tiny width (d 512,
    MLP 1408, 8 layers, 8 query / 2 KV heads), `recipe` stretched to 8 layers (each fraction used
    for two layers): where matmuls, not per-op overhead, dominate."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=64, vocab_size=32, max_position_embeddings=4096)
    stretched = TokenRecipe([f for f in recipe.keep_fraction for _ in range(2)])
    return time_decoder_prefill(LlamaModel(config).eval(), stretched, DecoderDims.from_config(config),
                                n_visual, n_text, repeats)


def length_check(model_path, recipe, prompts_records, repeats: int, n_visual: int = 576, n_text: int = 64) -> dict:
    """The model's own decoder and recipe on a prompt as long as a real LLaVA-NeXT's base view (576
    visual tokens): whether the FLOPs cut becomes time once the prompt is long enough."""
    model, processor = load_model(model_path, "cpu")
    lengths = [encode_record(processor, r, paths.EVAL_IMAGE_FOLDER, with_answer=False,
                             add_generation_prompt=True)["input_ids"].shape[1] for r in prompts_records]
    decoder = model.model.language_model
    out = time_decoder_prefill(decoder.eval(), recipe, DecoderDims.from_config(decoder.config),
                               n_visual, n_text, repeats)
    return {**out, "embedded_prompt_tokens": statistics.mean(lengths)}


def recipe_of(result: dict, budget: float):
    """The recipe an earlier run searched at `budget`, from its saved keep fractions."""
    return TokenRecipe(result["recipes"][f"{budget:g}"]["keep_fraction"])


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
        recipes = {"dense": None, **{name: recipe_of(earlier, float(name)) for name in earlier["recipes"]}}
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
