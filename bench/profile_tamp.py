"""Profile of one embedded TAMP run (`bash scripts/prune/tamp.sh` defaults: 128 samples, 50 %
unstructured, no vision-tower pruning) under cProfile, in a subprocess, summarised by where the
pruning time goes: the blocks' forward passes against what TAMP adds (DAS, AMIA, masks)."""

from __future__ import annotations

import json
import os
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (label, file suffix (or a tuple of them), function name) of the calls whose cumulative time is reported
FUNCTIONS = [
    ("prune_decoder (DAS sweep + prune sweep)", "mmprune/prune/pipeline.py", "prune_decoder"),
    ("block forward passes", "mmprune/prune/driver.py", "block_output"),
    ("AMIA select_tokens", "mmprune/prune/selection/amia.py", "select_tokens"),
    ("  AMIA greedy_select", "mmprune/prune/selection/amia.py", "greedy_select"),
    ("  AMIA build_graph", "mmprune/prune/selection/amia.py", "build_graph"),
    ("DAS/AMIA similarity_terms", "mmprune/prune/diversity.py", "similarity_terms"),
    ("last-token attention row", "mmprune/prune/attention.py", "last_token_attention"),
    ("Wanda masks (end_block)", "mmprune/prune/methods/wanda.py", "end_block"),
    # the loader's file before and after llava/convert.py became a package (older commits are profiled too)
    ("load_llava_next (model + processor)", ("llava/convert/loading.py", "llava/convert.py"), "load_llava_next"),
    ("plot_sparsity", "mmprune/run/report.py", "plot_sparsity"),
]


def summarise(stats_path: str) -> dict[str, float]:
    stats = pstats.Stats(stats_path).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    out = {}
    for label, suffix, name in FUNCTIONS:
        out[label] = sum(v[3] for (f, _, n), v in stats.items() if n == name and f.endswith(suffix))
    return out


def code_at(commit: str, folder: Path) -> Path:
    """The packages (mmprune/, llava/) as they were at `commit`, extracted with git archive (no
    checkout, the working tree is left alone)."""
    if not (folder / "mmprune").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", commit, "mmprune", "llava"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def profile_tamp(nsamples: int = 128, python: str = sys.executable, code: Path = ROOT) -> dict:
    """Profile the run with the packages found in `code` (python -m puts it first on sys.path);
    the model and data are always the working tree's embedded default."""
    from llava.embedded import paths as embedded

    with tempfile.TemporaryDirectory() as tmp:
        prof = os.path.join(tmp, "tamp.prof")
        out_dir = os.path.join(tmp, "pruned")
        cmd = [python, "-m", "cProfile", "-o", prof, "-m", "llava.pruners", "--method", "tamp",
               "--llm_sparsity_ratio", "0.5", "--sparsity_type", "unstructured", "--seed", "42",
               "--nsamples", str(nsamples), "--vit_sparsity_ratio", "0", "--save_model", out_dir, "--no_eval",
               "--model_path", str(embedded.CHECKPOINT_DIR), "--data_path", str(embedded.DATA_PATH),
               "--image_folder", str(embedded.IMAGE_FOLDER), "--task_split_path", str(embedded.TASK_SPLIT_PATH)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        done = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"profiled TAMP run failed:\n{done.stderr[-2000:]}")
        report = json.loads(Path(out_dir, "pruning_report.json").read_text())
        return {"functions_s": summarise(prof), "phases_s": report["time_seconds"], "nsamples": nsamples,
                "selected_fraction": report.get("amia", {}).get("selected_token_fraction_per_block")}


BASE_COMMIT = "9edd137"  # before the speed work of BENCHMARKS.md


def profile_before_after(nsamples: int = 128) -> dict:
    """The base commit's code and the current code, one after the other on the same machine state."""
    before_code = code_at(BASE_COMMIT, Path(tempfile.gettempdir()) / f"mmprune-{BASE_COMMIT}")
    before = profile_tamp(nsamples, code=before_code)
    after = profile_tamp(nsamples)
    return {"before": dict(before, commit=BASE_COMMIT), "after": after}


if __name__ == "__main__":
    print(json.dumps(profile_before_after(), indent=1))
