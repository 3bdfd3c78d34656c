"""`python -m llava.quality`: the quality table. Prunes the embedded LLaVA-NeXT (or any checkpoint)
with every method at every sparsity setting and calibration seed, evaluates each pruned model
(held-out accuracy, answer perplexity, real-text perplexity of the decoder), and writes a section of
`docs/results.md` (tables with the dense row, date, commit), the raw runs as JSON and a plot. The
default model is the SmolLM2 one (files `results.json`, `results_accuracy.png`); the tiny model
(EMBEDDED_MODEL=tiny or its --model_path) writes `results_tiny.json` / `results_accuracy_tiny.png`
and its own section.

Each run starts from the same dense weights (restored in memory) and the same captured
calibration inputs for its seed, so differences between methods come from the methods alone.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time

import torch

from llava.convert import load_llava_next
from llava.data import encode_record, load_records, select_task
from llava.embedded import paths as embedded
from llava.eval import DEFAULT_MAX_NEW_TOKENS, evaluate
from llava.model import MODALITY_NAMES, capture_decoder_inputs, decoder_layers
from mmprune.cli import run_main
from mmprune.pipeline import PRESETS, LanguageHead, PhaseTimer, PruneConfig, prune_decoder
from mmprune.realtext import add_realtext_argument, realtext_perplexity
from mmprune.errors import UserInputError
from mmprune.output import atomic_output_file, check_output_location, write_json_file
from mmprune.report import toolkit_commit, update_markdown_section, versions
from mmprune.sparsity import SparsityPattern

METHODS = ["magnitude", "wanda", "sparsegpt", "owl", "ecoflap", "das", "amia", "tamp"]


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
    parser.add_argument("--eval_samples", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="greedy answer length (default %(default)s, as llava.eval); the embedded answers are "
                             "at most 2 tokens, so 4 scores them the same and saves the decode steps of broken models")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=sorted(PRESETS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--patterns", nargs="+", default=["2:4", "4:8"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--ecoflap_samples", type=int, default=None, help="default: all calibration samples")
    parser.add_argument("--out_dir", default="docs")
    parser.add_argument("--jobs", type=int, default=2,
                        help="worker processes at once, one CPU thread each, one (seed, method) per worker")
    parser.add_argument("--only_seed", type=int, default=None, help=argparse.SUPPRESS)  # worker: one seed
    parser.add_argument("--skip_dense", action="store_true", help=argparse.SUPPRESS)  # worker: another has it
    parser.add_argument("--from_partials", nargs="+", default=None, metavar="JSON",
                        help="write the outputs from saved worker results (each one (seed, method) unit, run with "
                             "--only_seed/--methods/--partial) instead of measuring; minutes are summed over them")
    parser.add_argument("--partial", default=None, help=argparse.SUPPRESS)  # worker: raw results JSON
    add_realtext_argument(parser)
    args = parser.parse_args(argv)
    if args.model_path is None:
        args.model_path = str(embedded.default_checkpoint())
    return args


def output_names(args) -> dict:
    """Section, JSON and plot names: the tiny model's results live beside the default's."""
    suffix = embedded.results_suffix(args.model_path)
    return {"section": "weight-pruning" + suffix.replace("_", "-"), "json": f"results{suffix}.json",
            "plot": f"results_accuracy{suffix}.png"}


def settings(args) -> list[tuple[float, SparsityPattern]]:
    out = [(s, SparsityPattern()) for s in args.sparsities]
    for text in args.patterns:
        pattern = SparsityPattern.parse(text)
        out.append((pattern.ratio, pattern))
    return out


def setting_label(sparsity: float, pattern: SparsityPattern) -> str:
    return str(pattern) if pattern.is_nm else f"{sparsity:g}"


def run_all(args) -> dict:
    model, processor = load_llava_next(args.model_path, dtype=torch.float32)
    prefix, layers = decoder_layers(model)
    head = LanguageHead(model.model.language_model.norm, model.lm_head)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    eval_records = load_records(args.eval_data_path)[: args.eval_samples]
    records = load_records(args.data_path)

    def run_eval():
        result = evaluate(model, processor, eval_records, args.eval_image_folder, args.max_new_tokens, progress=False)
        if args.realtext_tokens:
            result["realtext"] = realtext_perplexity(model, processor.tokenizer, args.realtext_tokens).as_dict()
        return result

    started = time.perf_counter()
    dense = None if args.skip_dense else run_eval()
    if dense is not None:
        print(f"dense: accuracy {dense['accuracy']:.4f}", file=sys.stderr)
    runs = []
    for seed in args.seeds:
        if args.only_seed is not None and seed != args.only_seed:
            continue
        calib = select_task(records, args.task_split_path, args.task_name, args.nsamples, seed)
        samples = [encode_record(processor, r, args.image_folder, with_answer=True) for r in calib]
        store = capture_decoder_inputs(model, samples, "cpu", "cpu", len(samples))
        for method in args.methods:
            if method == "magnitude" and seed != args.seeds[0]:
                continue  # no calibration data: one seed is the whole story
            for sparsity, pattern in settings(args):
                model.load_state_dict(dense_state)
                cfg = PruneConfig(method=method, sparsity=sparsity, pattern=pattern, device="cpu")
                if args.ecoflap_samples:
                    cfg.ecoflap = type(cfg.ecoflap)(samples=args.ecoflap_samples, seed=seed)
                else:
                    cfg.ecoflap = type(cfg.ecoflap)(seed=seed)
                timer = PhaseTimer()
                outcome = prune_decoder(layers, prefix, store.clone(), cfg, MODALITY_NAMES, timer, head)
                result = run_eval()
                runs.append({"method": method, "setting": setting_label(sparsity, pattern), "seed": seed,
                             "achieved_sparsity": outcome.achieved, "accuracy": result["accuracy"],
                             "answer_perplexity": result["answer_perplexity"], "per_kind": result["per_kind"],
                             "realtext": result.get("realtext"), "prune_seconds": sum(timer.seconds.values())})
                print(f"{method:10s} {setting_label(sparsity, pattern):5s} seed {seed}: accuracy "
                      f"{result['accuracy']:.4f} ppl {result['answer_perplexity']:.3f} real-text ppl "
                      f"{_realtext(result)} ({sum(timer.seconds.values()):.1f}s)", file=sys.stderr)
    model.load_state_dict(dense_state)
    return {"dense": dense, "runs": runs, "minutes": (time.perf_counter() - started) / 60}


def _realtext_value(run: dict):
    """Real-text perplexity of a run, or None (not measured, or diverged)."""
    return (run.get("realtext") or {}).get("perplexity")


def _realtext(run: dict) -> str:
    value = _realtext_value(run)
    return "—" if value is None else f"{value:.1f}"


def _cell(values: list[float], digits: int) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    spread = (max(values) - min(values)) / 2
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def _table(title: str, labels: list, dense_value: str, methods: list, by_key: dict, value, digits: int) -> list:
    """Markdown table: a dense row, then one row per method of mean ± half-range cells of value(run)."""
    lines = ["", f"### {title}", "", "| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels),
             "| dense | " + " | ".join([dense_value] * len(labels)) + " |"]
    for method in methods:
        cells = []
        for label in labels:
            runs = by_key.get((method, label))
            values = [v for v in map(value, runs or []) if v is not None]
            cells.append("—" if runs is None else _cell(values, digits) if len(values) == len(runs)
                         else f"{_cell(values, digits)} ({len(runs) - len(values)} diverged)" if values else "diverged")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def realism_check(results: dict, by_key: dict) -> list:
    """The literature's ordering on real LLMs: at 0.5 unstructured, Wanda's real-text perplexity is
    below magnitude's. Stated from the measured numbers, whichever way they fall."""
    dense = _realtext_value(results["dense"])
    mag = [v for v in map(_realtext_value, by_key.get(("magnitude", "0.5"), [])) if v is not None]
    wanda = [v for v in map(_realtext_value, by_key.get(("wanda", "0.5"), [])) if v is not None]
    if dense is None or not mag or not wanda:
        return []
    holds = statistics.mean(wanda) < statistics.mean(mag)
    verdict = ("holds: Wanda's is below magnitude's, as on real LLMs" if holds else
               "does NOT hold: Wanda's is not below magnitude's, unlike real LLMs")
    return ["", "### Realism check", "",
            f"Real-text perplexity at 0.5 unstructured: dense {dense:.1f}, magnitude {statistics.mean(mag):.1f}, "
            f"Wanda {statistics.mean(wanda):.1f} (mean over seeds). The ordering {verdict}."]


def write_outputs(args, results: dict) -> None:
    os.makedirs(args.out_dir, exist_ok=True)
    names = output_names(args)
    labels = [setting_label(s, p) for s, p in settings(args)]
    meta = {"date": _dt.date.today().isoformat(), "commit": toolkit_commit(), "versions": versions(),
            "model_path": embedded.shown(args.model_path), "data_path": embedded.shown(args.data_path),
            "task_name": args.task_name,
            "nsamples": args.nsamples, "ecoflap_samples": args.ecoflap_samples or args.nsamples, "seeds": args.seeds,
            "eval_data_path": embedded.shown(args.eval_data_path),
            "eval_samples": results["dense"]["n"], "max_new_tokens": args.max_new_tokens,
            "realtext_tokens": args.realtext_tokens,
            "minutes": round(results["minutes"], 1)}
    write_json_file(os.path.join(args.out_dir, names["json"]), {"meta": meta, **results})
    by_key: dict[tuple[str, str], list[dict]] = {}
    for run in results["runs"]:
        by_key.setdefault((run["method"], run["setting"]), []).append(run)
    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    realtext = results["dense"].get("realtext") or {}
    lines = [
        f"## Weight pruning: {embedded.model_title(args.model_path)}",
        "",
        f"Produced by `python -m llava.quality` on {meta['date']}, commit `{meta['commit']}`, "
        f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}; "
        + (f"{results['minutes']:.0f} worker-minutes (one process per method, one thread each) on this machine's CPU."
         if results.get("merged") else f"{results['minutes']:.0f} minutes on this machine's CPU."),
        "",
        f"Model `{meta['model_path']}`; calibration: task `{args.task_name}`, {args.nsamples} samples, seeds "
        f"{', '.join(map(str, args.seeds))} (mean ± half the range over seeds; magnitude reads no data, one run"
        + (f"; ECoFLaP's zeroth-order scores from {args.ecoflap_samples} of the samples" if args.ecoflap_samples else "")
        + "); "
        f"evaluation: {results['dense']['n']} held-out samples of `{meta['eval_data_path']}`, greedy exact match "
        f"(at most {args.max_new_tokens} new tokens).",
    ]
    missing = [m for m in args.methods if m not in methods]
    if missing:
        lines += ["", f"Not in this table (no runs): {', '.join(missing)}."]
    if realtext.get("tokens"):
        lines += ["", f"Real-text perplexity: the language decoder alone on {realtext['tokens']:,} tokens of English "
                      f"text from Python's standard library (`mmprune/realtext.py`, sha256 `{realtext['sha256'][:12]}…`, "
                      f"windows of {realtext['window']}); \"diverged\" marks runs whose loss overflowed."]
    lines += _table("Accuracy (%)", labels, f"{100 * results['dense']['accuracy']:.1f}", methods, by_key,
                    lambda r: 100 * r["accuracy"], 1)
    lines += _table("Answer-token perplexity", labels, f"{results['dense']['answer_perplexity']:.3f}", methods,
                    by_key, lambda r: r["answer_perplexity"], 3)
    if realtext.get("tokens"):
        lines += _table("Real-text perplexity", labels, _realtext(results["dense"]), methods, by_key,
                        _realtext_value, 1)
        lines += realism_check(results, by_key)
    flags = (f"--seeds {' '.join(map(str, args.seeds))} --nsamples {args.nsamples} --eval_samples {results['dense']['n']} "
             f"--max_new_tokens {args.max_new_tokens} --realtext_tokens {args.realtext_tokens}"
             + (f" --ecoflap_samples {args.ecoflap_samples}" if args.ecoflap_samples else ""))
    command = ("EMBEDDED_MODEL=tiny " if embedded.is_tiny(args.model_path) else "") + f"python -m llava.quality {flags}"
    lines += ["", f"![accuracy and real-text perplexity against sparsity]({names['plot']})", "",
              f"Regenerate with `{command}` (`make quality` runs the defaults: seeds 42 43 44, 128 samples, "
              "every held-out question, 4,096 real-text tokens); raw runs (per seed, per question kind, achieved sparsity, "
              f"pruning time) are in `docs/{names['json']}`.", ""]
    update_markdown_section(os.path.join(args.out_dir, "results.md"), names["section"], "\n".join(lines),
                            title=RESULTS_TITLE)
    plot(args, results, by_key, methods, os.path.join(args.out_dir, names["plot"]))


def plot(args, results, by_key, methods, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_realtext = _realtext_value(results["dense"]) is not None
    fig, axes = plt.subplots(1, 2 if with_realtext else 1, figsize=(12 if with_realtext else 7.5, 4.5), squeeze=False)
    xs = [float(s) for s in args.sparsities]
    panels = [(axes[0][0], lambda r: 100 * r["accuracy"], 100 * results["dense"]["accuracy"], "held-out accuracy (%)")]
    if with_realtext:
        panels.append((axes[0][1], _realtext_value, _realtext_value(results["dense"]), "real-text perplexity (log)"))
    for ax, value, dense, ylabel in panels:
        for method in methods:
            points = []
            for x in xs:
                values = [value(r) for r in by_key.get((method, f"{x:g}"), [])]
                if values and None not in values:
                    points.append((x, statistics.mean(values)))
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.axhline(dense, color="black", linestyle="--", label="dense")
        ax.set_xlabel("unstructured sparsity of the decoder linears")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax is not axes[0][0]:
            ax.set_yscale("log")
    axes[0][0].legend(ncol=3, fontsize=8)
    fig.suptitle(f"{embedded.model_title(args.model_path).replace('`', '')}: mean over seeds")
    fig.tight_layout()
    with atomic_output_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def work_units(args) -> list[tuple[int, str]]:
    """(seed, method) pairs in table order; magnitude reads no data, so it runs for the first seed only."""
    return [(seed, method) for seed in args.seeds for method in args.methods
            if not (method == "magnitude" and seed != args.seeds[0])]


def run_in_workers(args, argv: list[str]) -> dict:
    """One worker process per (seed, method), `args.jobs` at a time, one CPU thread each (the
    per-sample work is small, so processes scale better than threads); only the first worker
    evaluates the dense model. Raw results are merged in table order."""
    import subprocess
    import tempfile

    started = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    units = work_units(args)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"{i}.json") for i in range(len(units))]
        pending = list(range(len(units)))
        running: list[tuple[subprocess.Popen, int]] = []
        try:
            while pending or running:
                while pending and len(running) < args.jobs:
                    i = pending.pop(0)
                    seed, method = units[i]
                    cmd = [sys.executable, "-m", "llava.quality", *argv, "--only_seed", str(seed), "--methods", method,
                           "--partial", paths[i]] + (["--skip_dense"] if i else [])
                    running.append((subprocess.Popen(cmd, env=env), i))
                finished = next(((proc, i) for proc, i in running if proc.poll() is not None), None)
                if finished is None:
                    time.sleep(0.5)
                    continue
                proc, i = finished
                if proc.returncode != 0:
                    raise RuntimeError(f"the quality worker for seed {units[i][0]}, {units[i][1]} failed "
                                       f"(exit {proc.returncode}); see above")
                running.remove(finished)
        except BaseException:  # a failed worker, or SIGTERM / Ctrl-C here: no worker outlives the run
            for other, _ in running:
                other.kill()
                other.wait()
            raise
        loaded = [json.load(open(path)) for path in paths]
    runs = [run for part in loaded for run in part["runs"]]
    return {"dense": loaded[0]["dense"], "runs": runs, "minutes": (time.perf_counter() - started) / 60}


def merge_partials(args, files: list) -> dict:
    """{dense, runs, minutes} from worker results saved by separate runs: runs in table order (seed,
    then --methods order), the dense result from the worker that has it, minutes summed."""
    loaded = []
    for path in files:
        with open(path, encoding="utf-8") as handle:
            loaded.append(json.load(handle))
    dense = [part["dense"] for part in loaded if part.get("dense")]
    if not dense:
        raise UserInputError("none of --from_partials holds the dense result (run one worker without --skip_dense)")
    order = {(seed, method): i for i, (seed, method) in enumerate(work_units(args))}
    runs = sorted((run for part in loaded for run in part["runs"]),
                  key=lambda run: order.get((run["seed"], run["method"]), len(order)))
    return {"dense": dense[0], "runs": runs, "minutes": sum(part["minutes"] for part in loaded), "merged": True}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # before the runs: the outputs neither overwrite nor land inside an input, and can be created
    inputs = [args.model_path, args.data_path, args.image_folder, args.task_split_path, args.eval_data_path,
              args.eval_image_folder]
    for name in ("results.md", *list(output_names(args).values())[1:]):
        check_output_location(args.partial or os.path.join(args.out_dir, name), inputs, "--out_dir")
    if args.partial:
        torch.set_num_threads(1)
        with open(args.partial, "w") as handle:
            json.dump(run_all(args), handle)
        return 0
    if args.from_partials:
        results = merge_partials(args, args.from_partials)
    elif args.jobs > 1 and len(work_units(args)) > 1:
        results = run_in_workers(args, argv)
    else:
        results = run_all(args)
    write_outputs(args, results)
    print(json.dumps({"results": os.path.join(args.out_dir, "results.md"), "runs": len(results["runs"]),
                      "minutes": round(results["minutes"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
