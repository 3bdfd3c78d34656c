"""Regenerate the "fitprune" section of docs/results.md on the embedded LLaVA-NeXT (minutes):

    python -m llava.fitprune_results            # or: make fitprune-results

The model is the embedded default (SmolLM2; EMBEDDED_MODEL=tiny: the tiny model, written to the
section "fitprune-tiny" and fitprune_results_tiny.json). For the dense embedded checkpoint and a TAMP 0.5 copy of it (made with scripts/prune/tamp.sh into a
temporary folder unless --tamp_model names one): recipe search at each budget (time, α, analytic
FLOPs reduction), accuracy and answer perplexity on the embedded eval split, and the measured prefill
time of dense vs recipe (one process, settings alternating prompt by prompt, median over repeats, in
--timing_rounds rounds), with a breakdown of where the time goes and a check at real prompt length.

--retime measures the timing again on an earlier run's recipes and accuracies (--json); --render
rewrites the section from --json alone. The measurements are llava/fitprune_measure.py's, the
section's text llava/fitprune_section.py's; this module holds the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from llava import fitprune as lfp
from llava.data import load_records
from llava.embedded import paths
from llava.fitprune_measure import length_check, measure_all, recipe_of, scaled_timing
from llava.fitprune_section import markdown
from mmprune.base.entry import run_main
from mmprune.base.errors import UserInputError
from mmprune.base.output import check_output_location, write_json_file
from mmprune.run.report import update_markdown_section

SECTION = "fitprune"


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
        recipe = lfp.as_recipe(recipe_of(results[0], 0.5))
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
