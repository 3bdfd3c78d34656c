"""Part 4: whole runs of our `wanda` / `sparsegpt` against llm-compressor's one-shot Wanda and
SparseGPT on the embedded tiny LLaVA-NeXT and the same calibration records.

Every run is a fresh process of bench/peer_side.py in .venv-peer (llm-compressor 0.14.0.1 pins
transformers 5.17; our package is installed there too, so both sides run on the same torch and
transformers). Runs alternate ours / theirs; each figure is the best of `rounds` runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("wanda", "sparsegpt")


def ensure_peer_venv(venv: Path) -> str | None:
    """Create the peer venv with tests/peer/run_peer_tests.sh if missing; None when usable, else why not."""
    python = venv / "bin" / "python"
    if not python.exists():
        env = dict(os.environ, PEER_SETUP_ONLY="1")
        done = subprocess.run(["bash", "tests/peer/run_peer_tests.sh", str(venv)], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            return f"cannot create {venv}: {(done.stdout + done.stderr).strip().splitlines()[-1:]}"
    check = subprocess.run([str(python), "-c", "import llmcompressor"], capture_output=True, text=True)
    if check.returncode != 0:
        return f"llm-compressor does not import in {venv}: {check.stderr.strip().splitlines()[-1:]}"
    return None


def _run_side(python: Path, side: str, method: str, nsamples: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        done = subprocess.run([str(python), "-m", "bench.peer_side", "--side", side, "--method", method,
                               "--nsamples", str(nsamples), "--out", out], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{side} {method} failed:\n{done.stderr[-2000:]}")
        with open(out) as f:
            return json.load(f)


def bench_peer(venv: str = ".venv-peer", nsamples: int = 128, rounds: int = 2) -> dict:
    path = (ROOT / venv).resolve()
    why_not = ensure_peer_venv(path)
    if why_not:
        return {"skipped": why_not}
    python = path / "bin" / "python"
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for method in METHODS:
            sides = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")  # alternate who goes first
            for side in sides:
                runs.setdefault((side, method), []).append(_run_side(python, side, method, nsamples))
    out = {"nsamples": nsamples, "rounds": rounds, "model": "checkpoints/embedded/llava-next-tiny",
           "transformers": runs[("ours", "wanda")][0]["transformers"]}
    for method in METHODS:
        ours, theirs = runs[("ours", method)], runs[("theirs", method)]
        best = {side: min(r["seconds"] for r in rs) for side, rs in (("ours", ours), ("theirs", theirs))}
        peak = {side: max(r["peak_above_imports_mb"] for r in rs) for side, rs in (("ours", ours), ("theirs", theirs))}
        total = {side: max(r["peak_total_mb"] for r in rs) for side, rs in (("ours", ours), ("theirs", theirs))}
        out[method] = {"ours_s": best["ours"], "theirs_s": best["theirs"], "time_ratio": best["ours"] / best["theirs"],
                       "ours_peak_mb": peak["ours"], "theirs_peak_mb": peak["theirs"],
                       "memory_ratio": peak["ours"] / peak["theirs"],
                       "ours_peak_total_mb": total["ours"], "theirs_peak_total_mb": total["theirs"],
                       "ours_sparsity": ours[0]["achieved_sparsity"], "theirs_sparsity": theirs[0]["achieved_sparsity"],
                       "all_seconds": {"ours": [r["seconds"] for r in ours], "theirs": [r["seconds"] for r in theirs]}}
    return out
