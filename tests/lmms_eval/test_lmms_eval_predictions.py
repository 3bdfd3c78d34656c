"""lmms-eval's llava_hf and `python -m llava.eval` give the same answer to every held-out question.

For the dense embedded LLaVA-NeXT and a TAMP 50% pruned copy, the local lmms-eval task of
`python -m llava.lmms_task` (lmms-eval's own CLI, its llava_hf model, generate()) and
llava.eval.evaluate (our tokenisation, greedy decoding) are run on the 300 records of the
embedded eval split; the decoded predictions must be equal record by record, and so the
accuracies. This holds only if both feed the model the same tokens: one BOS (the saved chat
template leaves it to the tokenizer), the same image tokens, the same pixels.

Runs in the lmms-eval venv: `bash tests/lmms_eval/run_lmms_eval_tests.sh` (about 5 minutes on
2 CPU cores, most of it lmms-eval's start-up and generate()). Skipped where lmms-eval is missing.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from importlib.metadata import PackageNotFoundError, version  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# By distribution, not `import lmms_eval`: with tests/ on sys.path (conftest.py) this very folder
# would import as a namespace package of that name.
try:
    version("lmms-eval")
except PackageNotFoundError:
    pytest.skip("lmms-eval is not installed here; run `bash tests/lmms_eval/run_lmms_eval_tests.sh` "
                "(its own venv, .venv-lmms-eval)", allow_module_level=True)

import engine_agreement as agreement  # noqa: E402

from llava.embedded import paths  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    """TAMP 50% unstructured on the embedded model, as scripts/prune/tamp.sh 0.5 runs it."""
    out = tmp_path_factory.mktemp("pruned") / "llava-next-tiny_tamp_0.5_unstructured"
    return agreement.tamp_pruned(paths.CHECKPOINT_DIR, out, 128)


def lmms_eval_predictions(model_dir, tmp_path) -> tuple:
    out = tmp_path / "lmms_eval"
    command = [sys.executable, "-m", "llava.lmms_task", "--model_path", str(model_dir), "--device", "cpu",
               "--output_path", str(out / "logs"), "--predictions", str(out / "predictions.jsonl")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    with open(out / "predictions.jsonl", encoding="utf-8") as f:
        return result, [json.loads(line) for line in f]


@pytest.mark.parametrize("which", ["dense", "pruned"])
def test_lmms_eval_predictions_equal_llava_eval(which, pruned_dir, tmp_path, capsys):
    model_dir = paths.CHECKPOINT_DIR if which == "dense" else pruned_dir
    agreement.assert_engine_agrees(which, model_dir, lambda d: lmms_eval_predictions(d, tmp_path), capsys)


def test_pruned_checkpoint_keeps_the_single_bos_template(pruned_dir):
    """The pruner saves the input's template, which leaves BOS to the tokenizer."""
    saved = (pruned_dir / "chat_template.jinja").read_text()
    assert saved == (paths.CHECKPOINT_DIR / "chat_template.jinja").read_text()
    assert "<|begin_of_text|>" not in saved
