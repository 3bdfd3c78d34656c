"""The quality grid's work units: one (seed, method) over the grid's settings, measured by a worker
process (`--only_seed --methods --partial`), saved as a small JSON, and merged into one table.

A saved unit records what it was measured with (the calibration setting, the measurement flags,
the commit), so units measured differently never merge into one table, and the table can say which
commits measured it. `--units_dir` keeps the units of a grid in a folder and reuses those already
there: an interrupted grid (hours on a CPU) resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter

from mmprune.base.errors import UserInputError

DEFAULT_CALIBRATION = "in-task"
# Flags that change what a unit measures (data paths are not among them: the same data may lie elsewhere).
MEASURE_FLAGS = ("nsamples", "eval_samples", "max_new_tokens", "realtext_tokens", "ecoflap_samples", "task_name")
UNRECORDED = "unrecorded"  # the commit (or CPU) of units saved before units recorded it


def cpu_name() -> str:
    """"AMD EPYC, AVX2 kernels": the CPU model and the vector kernels torch picked on it. float32 sums
    differ between kernels, and at 0.6-0.7 a near-tie in a mask can move a run by several points, so
    runs of one table measured on different CPUs are told apart."""
    import torch

    model = ""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "")
    return f"{model or platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()} kernels"


def calibration_of(args) -> str:
    """args' --calibration setting (in-task for argument objects made without it)."""
    return getattr(args, "calibration", DEFAULT_CALIBRATION)


def model_name(args) -> str | None:
    """The checkpoint folder's name ("llava-next-smol"): which model a unit measured, wherever it lies."""
    path = getattr(args, "model_path", None)
    return os.path.basename(os.path.normpath(path)) if path else None


def measure_flags(args) -> dict:
    """The flags of `args` that change what a unit measures (and the model's name), as the unit records them."""
    flags = {name: getattr(args, name) for name in MEASURE_FLAGS if hasattr(args, name)}
    if model_name(args):
        flags["model"] = model_name(args)
    return flags


def work_units(args) -> list[tuple[int, str]]:
    """(seed, method) pairs in table order; magnitude reads no data, so it runs for the first seed only."""
    return [(seed, method) for seed in args.seeds for method in args.methods
            if not (method == "magnitude" and seed != args.seeds[0])]


def unit_file_name(args, seed: int, method: str, labels: list[str]) -> str:
    """`llava.quality-llava-next-smol-generic-seed43-tamp-0.5_2-4.json`: the grid, model, setting,
    seed, method and settings of a unit, so the grids of both models can share one folder."""
    settings = "_".join(label.replace(":", "-") for label in labels)
    grid = "-".join(filter(None, [getattr(args, "grid_module", None), model_name(args)]))
    return f"{grid + '-' if grid else ''}{calibration_of(args)}-seed{seed}-{method}-{settings}.json"


def load_unit(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def check_unit(args, path: str, unit: dict) -> None:
    """A saved unit may join this grid only if it was measured with the grid's --calibration and
    measurement flags (units saved before they recorded their flags are taken on trust)."""
    calibration = unit.get("calibration", DEFAULT_CALIBRATION)  # saved before the option existed: in-task
    if calibration != calibration_of(args):
        raise UserInputError(f"{path} was measured with --calibration {calibration}, this run asks for "
                             f"--calibration {calibration_of(args)}; pass the partials of one setting with its "
                             "--calibration")
    wanted = measure_flags(args)
    for name, value in (unit.get("flags") or {}).items():
        if name in wanted and wanted[name] != value:
            flag = "--model_path named " if name == "model" else f"--{name} "
            raise UserInputError(f"{path} was measured with {flag}{value}, this run has {flag}{wanted[name]}; "
                                 f"give the same {flag.split()[0]}, or measure the unit again (another --units_dir)")


def run_in_workers(args, argv: list[str], labels: list[str]) -> dict:
    """One worker process per (seed, method), `args.jobs` at a time, one CPU thread each (the
    per-sample work is small, so processes scale better than threads); one worker evaluates the
    dense model. With `args.units_dir` the units are kept there and the ones already saved are
    reused; otherwise they live in a temporary folder. Raw results are merged in table order."""
    started = time.perf_counter()
    keep = getattr(args, "units_dir", None)
    if keep:
        os.makedirs(keep, exist_ok=True)
    with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory() as folder:
        units = work_units(args)
        paths = [os.path.join(folder, unit_file_name(args, seed, method, labels)) for seed, method in units]
        saved = {i: load_unit(p) for i, p in enumerate(paths) if os.path.isfile(p)}
        for i, unit in saved.items():
            check_unit(args, paths[i], unit)
        if saved:
            print(f"{len(saved)} of {len(units)} units already in {folder}; measuring the other "
                  f"{len(units) - len(saved)}", file=sys.stderr)
        has_dense = any(unit.get("dense") for unit in saved.values())
        _measure(args, argv, [(i, units[i], paths[i]) for i in range(len(units)) if i not in saved], has_dense)
        loaded = [saved[i] if i in saved else load_unit(path) for i, path in enumerate(paths)]
    results = merge_units(args, loaded)
    if not saved:  # all measured now: the wall time; otherwise the units' minutes summed, as merged
        results["minutes"] = (time.perf_counter() - started) / 60
        results.pop("merged")
    return results


def _measure(args, argv: list[str], pending: list, has_dense: bool) -> None:
    """Runs the pending (index, (seed, method), path) units; the first one started evaluates the
    dense model unless a saved unit has it. A failure, SIGTERM or Ctrl-C kills every worker; the
    units finished so far stay saved (each written atomically)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    running: list[tuple[subprocess.Popen, tuple]] = []
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                i, (seed, method), path = job = pending.pop(0)
                cmd = [sys.executable, "-m", args.grid_module, *argv, "--only_seed", str(seed), "--methods",
                       method, "--partial", path] + (["--skip_dense"] if has_dense else [])
                has_dense = True
                running.append((subprocess.Popen(cmd, env=env), job))
            finished = next(((proc, job) for proc, job in running if proc.poll() is not None), None)
            if finished is None:
                time.sleep(0.5)
                continue
            proc, (_, (seed, method), _) = finished
            if proc.returncode != 0:
                raise RuntimeError(f"the quality worker for seed {seed}, {method} failed (exit {proc.returncode}); "
                                   "see above")
            running.remove(finished)
    except BaseException:
        for other, _ in running:
            other.kill()
            other.wait()
        raise


def merge_units(args, loaded: list[dict]) -> dict:
    """{calibration, dense, runs, minutes, commits, cpus, merged} of saved units: runs in table order
    (seed, then --methods order), the dense result from the unit that has it, minutes summed, and
    how many runs each commit and each CPU measured."""
    dense = [unit["dense"] for unit in loaded if unit.get("dense")]
    if not dense:
        raise UserInputError("none of --from_partials holds the dense result (run one worker without --skip_dense)")
    order = {(seed, method): i for i, (seed, method) in enumerate(work_units(args))}
    runs = sorted((run for unit in loaded for run in unit["runs"]),
                  key=lambda run: order.get((run["seed"], run["method"]), len(order)))
    commits, cpus = Counter(), Counter()
    for unit in loaded:
        commits[unit.get("commit") or UNRECORDED] += len(unit["runs"])
        cpus[unit.get("cpu") or UNRECORDED] += len(unit["runs"])
    return {"calibration": calibration_of(args), "dense": dense[0], "runs": runs,
            "minutes": sum(unit["minutes"] for unit in loaded), "commits": dict(commits.most_common()),
            "cpus": dict(cpus.most_common()), "merged": True}


def merge_partials(args, files: list) -> dict:
    """merge_units of saved unit files, each checked against this run's setting and flags."""
    loaded = []
    for path in files:
        loaded.append(load_unit(path))
        check_unit(args, path, loaded[-1])
    return merge_units(args, loaded)


def _runs(n: int) -> str:
    return f"{n} run" + ("" if n == 1 else "s")


def commits_text(commits: dict) -> str:
    """"runs measured at commits `a1b2c3d` (40 runs), `e4f5a6b` (8 runs); 3 runs saved before units
    recorded their commit" of merged units ("" for none)."""
    parts = [f"`{commit}` ({_runs(n)})" for commit, n in commits.items() if commit != UNRECORDED]
    text = "runs measured at " + ("commit " if len(parts) == 1 else "commits ") + ", ".join(parts) if parts else ""
    if commits.get(UNRECORDED):
        text += ("; " if text else "") + f"{_runs(commits[UNRECORDED])} saved before units recorded their commit"
    return text


def cpus_text(cpus: dict) -> str:
    """"on CPU AMD EPYC, AVX2 kernels (8 runs); 3 runs saved before units recorded their CPU" ("" for none)."""
    parts = [f"{cpu} ({_runs(n)})" for cpu, n in cpus.items() if cpu != UNRECORDED]
    text = ("on CPU " if len(parts) == 1 else "on CPUs ") + "; ".join(parts) if parts else ""
    if cpus.get(UNRECORDED) and parts:
        text += f"; {_runs(cpus[UNRECORDED])} saved before units recorded their CPU"
    return text
