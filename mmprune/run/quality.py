"""The quality grid behind `python -m llava.quality` and `python -m videollama2.quality`: every
method at every sparsity setting and calibration seed, each pruned model evaluated, the results
written as a section of docs/results.md (tables with the dense row, date, commit), raw JSON and a
plot. The model adapters hand over a `GridModel` (decoder blocks, a calibration capture per seed,
an evaluation) and the words of their section; everything else lives here once.

Each run starts from the same dense weights (restored in memory) and the same captured calibration
inputs for its seed, so differences between methods come from the methods alone.

`--calibration` picks where the calibration data comes from: `in-task` (the evaluation's own task,
as before) or a transfer setting the adapter generates from each seed (`cross-kind`: questions of
other kinds than the evaluated ones; `generic`: conversations that are not the task's questions).
The setting names every table, goes into the output names (in-task keeps the old ones) and is part
of each saved worker result, so results of different settings never mix.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from mmprune.base.errors import UserInputError
from mmprune.base.output import atomic_output_file, check_output_location, write_json_file
from mmprune.prune.pipeline import PRESETS, PhaseTimer, PruneConfig, prune_decoder
from mmprune.evaluate.realtext import add_realtext_argument
from mmprune.run.grid_units import (DEFAULT_CALIBRATION, calibration_of, commits_text, cpu_name, cpus_text,
                                     measure_flags, merge_partials, run_in_workers, work_units)
from mmprune.run.report import (READING_BEGIN, READING_END, block_term_means, toolkit_commit, update_markdown_section,
                                versions)
from mmprune.prune.sparsity import SparsityPattern

METHODS = ["magnitude", "wanda", "sparsegpt", "owl", "ecoflap", "das", "amia", "tamp", "atv"]
CALIBRATIONS = ("in-task", "cross-kind", "generic")


@dataclass
class GridModel:
    """What a model adapter gives the grid."""
    model: torch.nn.Module
    layers: list
    prefix: str
    head: object  # mmprune.prune.pipeline.LanguageHead
    modality_names: dict
    calibrate: Callable[[int], object]  # seed -> the captured decoder inputs (a store with .clone())
    evaluate: Callable[[], dict]  # {"n", "accuracy", "answer_perplexity", "per_kind", optional "realtext"}


@dataclass
class Section:
    """The words and names of one model's section of docs/results.md."""
    name: str  # section id, e.g. "weight-pruning"
    json_name: str
    plot_name: str
    heading: str  # "## ..."
    producer: str  # "python -m llava.quality"
    command_prefix: str  # environment put before the regenerate command ("" or "EMBEDDED_MODEL=tiny ")
    calibration: str  # what the calibration data is, e.g. "task `sharegpt4v`"
    defaults: str  # what `make ...` runs
    results_title: str
    meta: dict = field(default_factory=dict)  # extra fields of the JSON's meta
    kinds: dict = field(default_factory=dict)  # question kind -> its table's words, e.g. {"both": "questions on both streams"}
    das_terms: bool = False  # a table of the DAS terms of one TAMP run
    setting: str = DEFAULT_CALIBRATION  # the --calibration setting, named in the heading and every table
    evaluation: str = ""  # which held-out questions, e.g. "count and position questions" ("": all of them)


def section_heading(what: str, setting: str, title: str) -> str:
    """"## Weight pruning, cross-kind calibration: <model>": the setting is part of every heading."""
    return f"## {what}, {setting} calibration: {title}"


def make_defaults(target: str, setting: str, words: str) -> str:
    """What `make <target>` runs, for the section's regenerate line (a transfer setting through
    the Makefile's CALIBRATION variable)."""
    extra = "" if setting == DEFAULT_CALIBRATION else f" CALIBRATION={setting}"
    return f"`make {target}{extra}` runs the defaults: {words}"


def add_grid_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, module: str,
                       calibrations: dict | None = None) -> None:
    """The grid's own flags (the adapters add their model and data flags); `calibrations` maps each
    --calibration setting to the adapter's words for its --help."""
    words = calibrations or {}
    parser.add_argument("--calibration", choices=CALIBRATIONS, default=DEFAULT_CALIBRATION,
                        help="where the calibration data comes from (default %(default)s; docs/method.md, "
                             "\"Calibration settings of the quality grids\"): "
                             + "; ".join(f"{name}: {words.get(name, '')}".rstrip(": ") for name in CALIBRATIONS)
                             + ". Each setting writes its own section, JSON and plot")
    parser.add_argument("--eval_samples", type=int, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=max_new_tokens,
                        help="greedy answer length (default %(default)s); the embedded answers are a few tokens, so a "
                             "small cap scores them the same and saves the decode steps of broken models")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=sorted(PRESETS))
    parser.add_argument("--sparsities", nargs="*", type=float, default=[0.5, 0.6, 0.7, 0.8],
                        help="unstructured settings (none: only --patterns)")
    parser.add_argument("--patterns", nargs="*", default=["2:4", "4:8"], help="N:M settings (none: only --sparsities)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--ecoflap_samples", type=int, default=None, help="default: all calibration samples")
    parser.add_argument("--out_dir", default="docs")
    parser.add_argument("--jobs", type=int, default=2,
                        help="worker processes at once, one CPU thread each, one (seed, method) per worker")
    parser.add_argument("--units_dir", default=None, metavar="DIR",
                        help="keep each (seed, method) unit's raw results in DIR and reuse the ones already there "
                             "(same --calibration and measurement flags, else an error): an interrupted grid resumes "
                             "where it stopped")
    parser.add_argument("--only_seed", type=int, default=None, help=argparse.SUPPRESS)  # worker: one seed
    parser.add_argument("--skip_dense", action="store_true", help=argparse.SUPPRESS)  # worker: another has it
    parser.add_argument("--from_partials", nargs="+", default=None, metavar="JSON",
                        help="write the outputs from saved worker results (each one (seed, method) unit, run with "
                             "--only_seed/--methods/--partial) instead of measuring; minutes are summed over them")
    parser.add_argument("--partial", default=None, help=argparse.SUPPRESS)  # worker: raw results JSON
    add_realtext_argument(parser)
    parser.set_defaults(grid_module=module)


def output_names(section: str, stem: str, suffix: str, calibration: str = DEFAULT_CALIBRATION) -> dict:
    """Section, JSON and plot names of a results family; a model's `suffix` ("_tiny") keeps its
    results beside the default model's, and a transfer setting's beside the in-task ones (which
    keep the names they had before the settings existed)."""
    if calibration != DEFAULT_CALIBRATION:
        suffix = "_" + calibration.replace("-", "_") + suffix
    return {"section": section + suffix.replace("_", "-"), "json": f"{stem}{suffix}.json",
            "plot": f"{stem}_accuracy{suffix}.png"}


def check_outputs(args, names: dict, inputs: list) -> None:
    """Before any run: there is something to measure, and the outputs neither overwrite nor land
    inside an input, and can be created."""
    if not args.sparsities and not args.patterns:
        raise UserInputError("--sparsities and --patterns are both empty; give at least one setting")
    for name in ("results.md", names["json"], names["plot"]):
        check_output_location(args.partial or os.path.join(args.out_dir, name), inputs, "--out_dir")
    if getattr(args, "units_dir", None):
        check_output_location(args.units_dir, inputs, "--units_dir")
        if os.path.exists(args.units_dir) and not os.path.isdir(args.units_dir):
            raise UserInputError(f"--units_dir {args.units_dir} is a file, not a folder; choose another --units_dir")


def settings(args) -> list[tuple[float, SparsityPattern]]:
    out = [(s, SparsityPattern()) for s in args.sparsities]
    for text in args.patterns:
        pattern = SparsityPattern.parse(text)
        out.append((pattern.ratio, pattern))
    return out


def setting_label(sparsity: float, pattern: SparsityPattern) -> str:
    return str(pattern) if pattern.is_nm else f"{sparsity:g}"


# ------------------------------------------------------------------------------ measuring


def run_grid(args, grid: GridModel) -> dict:
    """{"calibration", "dense", "runs", "minutes"}: the dense evaluation (unless --skip_dense), then
    every (seed, method, setting) of args (--only_seed: that seed only), calibrated as
    args.calibration says."""
    dense_state = {k: v.clone() for k, v in grid.model.state_dict().items()}
    started = time.perf_counter()
    dense = None if args.skip_dense else grid.evaluate()
    if dense is not None:
        print(f"dense: accuracy {dense['accuracy']:.4f}", file=sys.stderr)
    runs = []
    for seed in args.seeds:
        if args.only_seed is not None and seed != args.only_seed:
            continue
        store = grid.calibrate(seed)
        dense_sweeps: dict = {}  # same dense weights and inputs for every run of this seed
        for method in args.methods:
            if method == "magnitude" and seed != args.seeds[0]:
                continue  # no calibration data: one seed is the whole story
            for sparsity, pattern in settings(args):
                grid.model.load_state_dict(dense_state)
                cfg = PruneConfig(method=method, sparsity=sparsity, pattern=pattern, device="cpu")
                cfg.ecoflap = type(cfg.ecoflap)(seed=seed, **({"samples": args.ecoflap_samples}
                                                               if args.ecoflap_samples else {}))
                timer = PhaseTimer()
                outcome = prune_decoder(grid.layers, grid.prefix, store.clone(), cfg, grid.modality_names, timer,
                                        grid.head, dense_sweeps)
                result = grid.evaluate()
                run = {"method": method, "setting": setting_label(sparsity, pattern), "seed": seed,
                       "calibration": calibration_of(args), "achieved_sparsity": outcome.achieved,
                       "accuracy": result["accuracy"], "answer_perplexity": result["answer_perplexity"],
                       "per_kind": result["per_kind"], "realtext": result.get("realtext"),
                       "prune_seconds": sum(timer.seconds.values())}
                if outcome.das is not None:
                    run["das_block_terms"] = block_term_means(outcome.das.group_terms)
                runs.append(run)
                print(f"{method:10s} {run['setting']:5s} seed {seed}: accuracy {result['accuracy']:.4f} ppl "
                      f"{result['answer_perplexity']:.3f} real-text ppl {realtext_text(result)} "
                      f"({run['prune_seconds']:.1f}s)", file=sys.stderr)
    grid.model.load_state_dict(dense_state)
    return {"calibration": calibration_of(args), "dense": dense, "runs": runs,
            "minutes": (time.perf_counter() - started) / 60, "commit": toolkit_commit(), "cpu": cpu_name(),
            "flags": measure_flags(args)}


def run(args, argv: list[str], load: Callable[[object], GridModel], write: Callable[[object, dict], None]) -> dict:
    """The command's flow: a worker writes its raw results (--partial); otherwise the results come
    from saved partials, worker processes or this process, and `write` turns them into the outputs."""
    if args.partial:
        torch.set_num_threads(1)
        results = run_grid(args, load(args))
        write_json_file(args.partial, results)  # atomic: an interrupted worker leaves no half file
        return {}
    if args.from_partials:
        results = merge_partials(args, args.from_partials)
    elif args.units_dir or (args.jobs > 1 and len(work_units(args)) > 1):
        results = run_in_workers(args, argv, [setting_label(s, p) for s, p in settings(args)])
    else:
        results = run_grid(args, load(args))
    write(args, results)
    print(json.dumps({"results": os.path.join(args.out_dir, "results.md"), "runs": len(results["runs"]),
                      "minutes": round(results["minutes"], 1)}))
    return results


# ------------------------------------------------------------------------------ writing


def realtext_value(run: dict):
    """Real-text perplexity of a run, or None (not measured, or diverged)."""
    return (run.get("realtext") or {}).get("perplexity")


def realtext_text(run: dict) -> str:
    value = realtext_value(run)
    return "—" if value is None else f"{value:.1f}"


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    spread = (max(values) - min(values)) / 2
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def table(title: str, labels: list, dense_value: str, methods: list, by_key: dict, value, digits: int) -> list:
    """Markdown table: a dense row, then one row per method of mean ± half-range cells of value(run)."""
    lines = ["", f"### {title}", "", "| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels),
             "| dense | " + " | ".join([dense_value] * len(labels)) + " |"]
    for method in methods:
        cells = []
        for label in labels:
            runs = by_key.get((method, label))
            values = [v for v in map(value, runs or []) if v is not None]
            cells.append("—" if runs is None else cell(values, digits) if len(values) == len(runs)
                         else f"{cell(values, digits)} ({len(runs) - len(values)} diverged)" if values else "diverged")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def realism_check(results: dict, by_key: dict, tag: str = "") -> list:
    """The literature's ordering on real LLMs: at 0.5 unstructured, Wanda's real-text perplexity is
    below magnitude's. Stated from the measured numbers, whichever way they fall."""
    dense = realtext_value(results["dense"])
    mag = [v for v in map(realtext_value, by_key.get(("magnitude", "0.5"), [])) if v is not None]
    wanda = [v for v in map(realtext_value, by_key.get(("wanda", "0.5"), [])) if v is not None]
    if dense is None or not mag or not wanda:
        return []
    holds = statistics.mean(wanda) < statistics.mean(mag)
    verdict = ("holds: Wanda's is below magnitude's, as on real LLMs" if holds else
               "does NOT hold: Wanda's is not below magnitude's, unlike real LLMs")
    return ["", f"### Realism check{tag}", "",
            f"Real-text perplexity at 0.5 unstructured: dense {dense:.1f}, magnitude {statistics.mean(mag):.1f}, "
            f"Wanda {statistics.mean(wanda):.1f} (mean over seeds). The ordering {verdict}."]


def kind_accuracy(run: dict, kind: str):
    entry = run.get("per_kind", {}).get(kind)
    return None if entry is None else 100 * entry["accuracy"]


def das_terms_lines(runs: list, plot_name: str | None, tag: str = "") -> list:
    """The DAS diversity terms of the first TAMP run at 0.5 (else the first run that has terms):
    per block, the mean over its linears, and their mean over blocks."""
    chosen = next((r for r in runs if r["method"] == "tamp" and r["setting"] == "0.5" and r.get("das_block_terms")),
                  next((r for r in runs if r.get("das_block_terms")), None))
    if chosen is None:
        return []
    blocks = chosen["das_block_terms"]
    names = sorted({t for terms in blocks.values() for t in terms})
    order = sorted(blocks, key=int)
    shown = sorted({order[0], order[len(order) // 4], order[len(order) // 2], order[3 * len(order) // 4], order[-1]},
                   key=int)
    lines = ["", f"### DAS diversity terms ({chosen['method']} {chosen['setting']}, seed {chosen['seed']}){tag}", "",
             f"Mean over each block's linears of each of the {len(names)} intra/inter-modality terms of the dense "
             "sweep (larger: more diverse outputs, so less pruning); all blocks"
             + (f" in `{plot_name}`" if plot_name else "") + ".", "",
             "| term | " + " | ".join(f"block {b}" for b in shown) + " | mean over blocks |",
             "|---|" + "---|" * (len(shown) + 1)]
    for name in names:
        values = [blocks[b][name] for b in order if name in blocks[b]]
        lines.append(f"| {name} | " + " | ".join(f"{blocks[b].get(name, float('nan')):.4f}" for b in shown)
                     + f" | {statistics.mean(values):.4f} |")
    return lines


def dense_split_text(dense: dict, kinds: dict) -> str:
    """The dense model's accuracy on the evaluation split, overall and per question kind."""
    per_kind = [f"{kind} {kind_accuracy(dense, kind):.1f}%" for kind in kinds if kind in dense.get("per_kind", {})]
    return f"dense accuracy {100 * dense['accuracy']:.1f}%" + (f" ({', '.join(per_kind)})" if per_kind else "")


def partial_note(args, runs: list, n_settings: int) -> list:
    """A line that marks a section measured only in part (a long grid committed while it runs):
    how many of the grid's runs exist and which seeds they come from; nothing for a full grid."""
    expected = len(work_units(args)) * n_settings
    if len(runs) >= expected:
        return []
    seeds = sorted({run["seed"] for run in runs})
    return ["", f"**Partial**: {len(runs)} of the grid's {expected} runs are measured so far (— marks the rest; "
                f"seeds so far: {', '.join(map(str, seeds)) or 'none'}); a cell with one seed has no spread. The "
                "section is rewritten when the grid completes."]


def write_section(args, results: dict, section: Section) -> None:
    """docs/results.md's section, the raw JSON and the plot(s) of a grid's results."""
    os.makedirs(args.out_dir, exist_ok=True)
    labels = [setting_label(s, p) for s, p in settings(args)]
    dense = results["dense"]
    tag = f" ({section.setting} calibration)"  # every table names the setting
    meta = {"date": _dt.date.today().isoformat(), "commit": toolkit_commit(), "versions": versions(),
            "calibration": section.setting, **section.meta,
            "nsamples": args.nsamples, "ecoflap_samples": args.ecoflap_samples or args.nsamples, "seeds": args.seeds,
            "eval_samples": dense["n"], "max_new_tokens": args.max_new_tokens,
            "realtext_tokens": args.realtext_tokens, "minutes": round(results["minutes"], 1)}
    commits = results.get("commits") or {}
    measured = commits_text(commits) if set(commits) != {meta["commit"]} else ""  # runs older than this commit
    cpus = results.get("cpus") or ({results["cpu"]: len(results["runs"])} if results.get("cpu") else {})
    measured = "; ".join(filter(None, [measured, cpus_text(cpus)]))
    write_json_file(os.path.join(args.out_dir, section.json_name), {"meta": meta, **results})
    by_key: dict[tuple[str, str], list[dict]] = {}
    for run_ in results["runs"]:
        by_key.setdefault((run_["method"], run_["setting"]), []).append(run_)
    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    realtext = dense.get("realtext") or {}
    lines = [
        section.heading, "",
        f"Produced by `{section.producer}` on {meta['date']}, commit `{meta['commit']}`"
        + (f" ({measured})" if measured else "") + ", "
        f"torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}; "
        + (f"{results['minutes']:.0f} worker-minutes (one process per method, one thread each) on this machine's CPU."
           if results.get("merged") else f"{results['minutes']:.1f} minutes on this machine's CPU."),
        "",
        f"Model `{meta.get('model_path')}`; calibration setting **{section.setting}**: {section.calibration}, "
        f"{args.nsamples} samples, seeds "
        f"{', '.join(map(str, args.seeds))} (mean ± half the range over seeds; magnitude reads no data, one run"
        + (f"; ECoFLaP's zeroth-order scores from {args.ecoflap_samples} of the samples" if args.ecoflap_samples else "")
        + "); "
        f"evaluation: {dense['n']} held-out samples{f' ({section.evaluation})' if section.evaluation else ''} of "
        f"`{meta.get('eval_data_path')}`, greedy exact match (at most {args.max_new_tokens} new tokens); "
        f"{dense_split_text(dense, section.kinds)}.",
    ]
    missing = [m for m in args.methods if m not in methods]
    if missing:
        lines += ["", f"Not in this table (no runs): {', '.join(missing)}."]
    lines += partial_note(args, results["runs"], len(labels))
    if realtext.get("tokens"):
        lines += ["", f"Real-text perplexity: the language decoder alone on {realtext['tokens']:,} tokens of English "
                      f"text from Python's standard library (`mmprune/evaluate/realtext.py`, sha256 `{realtext['sha256'][:12]}…`, "
                      f"windows of {realtext['window']}); \"diverged\" marks runs whose loss overflowed."]
    lines += table(f"Accuracy (%){tag}", labels, f"{100 * dense['accuracy']:.1f}", methods, by_key,
                   lambda r: 100 * r["accuracy"], 1)
    for kind, words in section.kinds.items():
        if kind in dense.get("per_kind", {}):
            lines += table(f"Accuracy (%), {words}{tag}", labels, f"{kind_accuracy(dense, kind):.1f}", methods,
                           by_key, lambda r, kind=kind: kind_accuracy(r, kind), 1)
    lines += table(f"Answer-token perplexity{tag}", labels, f"{dense['answer_perplexity']:.3f}", methods,
                   by_key, lambda r: r["answer_perplexity"], 3)
    if realtext.get("tokens"):
        lines += table(f"Real-text perplexity{tag}", labels, realtext_text(dense), methods, by_key, realtext_value, 1)
        lines += realism_check(results, by_key, tag)
    terms_plot = section.plot_name.replace(".png", "_das_terms.png") if section.das_terms else None
    if section.das_terms:
        terms = das_terms_lines(results["runs"], terms_plot, tag)
        lines += terms
        if not terms:
            terms_plot = None
    flags = (f"--methods {' '.join(args.methods)} --sparsities {' '.join(f'{x:g}' for x in args.sparsities)} "
             f"--patterns {' '.join(args.patterns)} "
             f"--seeds {' '.join(map(str, args.seeds))} --nsamples {args.nsamples} --eval_samples {dense['n']} "
             f"--max_new_tokens {args.max_new_tokens} --realtext_tokens {args.realtext_tokens}"
             + (f" --ecoflap_samples {args.ecoflap_samples}" if args.ecoflap_samples else "")
             + f" --calibration {section.setting}")
    lines += ["", READING_BEGIN, READING_END]  # a reading written there by hand outlives regeneration
    lines += ["", f"![accuracy and real-text perplexity against sparsity]({section.plot_name})", "",
              f"Regenerate with `{section.command_prefix}{section.producer} {flags}` ({section.defaults}); raw runs "
              "(per seed, per question kind, achieved sparsity, pruning time) are in "
              f"`{os.path.join(os.path.basename(os.path.normpath(args.out_dir)), section.json_name)}`.", ""]
    update_markdown_section(os.path.join(args.out_dir, "results.md"), section.name, "\n".join(lines),
                            title=section.results_title)
    title = section.heading.lstrip("# ").split(": ", 1)[-1].replace("`", "") + tag
    plot(args, results, by_key, methods, os.path.join(args.out_dir, section.plot_name), title)
    if terms_plot:
        plot_das_terms(results["runs"], os.path.join(args.out_dir, terms_plot), title)


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_output_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(args, results, by_key, methods, path, title: str) -> None:
    plt = _pyplot()
    with_realtext = realtext_value(results["dense"]) is not None
    fig, axes = plt.subplots(1, 2 if with_realtext else 1, figsize=(12 if with_realtext else 7.5, 4.5), squeeze=False)
    xs = [float(s) for s in args.sparsities]
    panels = [(axes[0][0], lambda r: 100 * r["accuracy"], 100 * results["dense"]["accuracy"], "held-out accuracy (%)")]
    if with_realtext:
        panels.append((axes[0][1], realtext_value, realtext_value(results["dense"]), "real-text perplexity (log)"))
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
    fig.suptitle(f"{title}: mean over seeds", fontsize=11)
    _save(fig, path)


def plot_das_terms(runs: list, path: str, title: str) -> None:
    chosen = next((r for r in runs if r["method"] == "tamp" and r["setting"] == "0.5" and r.get("das_block_terms")),
                  next(r for r in runs if r.get("das_block_terms")))
    blocks = chosen["das_block_terms"]
    order = sorted(blocks, key=int)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in sorted({t for terms in blocks.values() for t in terms}):
        points = [(int(b), blocks[b][name]) for b in order if name in blocks[b]]
        ax.plot(*zip(*points), marker=".", label=name)
    ax.set_xlabel("decoder block")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("diversity term (mean over the block's linears)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    ax.set_title(f"{title}\nDAS terms of {chosen['method']} {chosen['setting']}, seed {chosen['seed']}", fontsize=10)
    _save(fig, path)
