import os
import shutil
import sys
from pathlib import Path

import pytest

# Scripts and entry points run without a model path fall back to the embedded default; the suite
# uses the tiny one (fast). Tests of the smol default set EMBEDDED_MODEL=smol themselves.
os.environ["EMBEDDED_MODEL"] = "tiny"

# tests import their shared fixture builders (fixtures_llava) as plain modules
sys.path.insert(0, str(Path(__file__).resolve().parent))
# the asserts of a shared checker report their operands, as a test module's do
pytest.register_assert_rewrite("engine_agreement")


@pytest.fixture(scope="module")
def module_scratch(tmp_path_factory):
    """A folder for one module's large fixtures (assembled checkpoints), removed when the module ends:
    pytest would keep it to the end of the session, and the suite must fit a CI disk of a few GB."""
    folder = tmp_path_factory.mktemp("module")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def embedded_llava():
    """(model, processor) of the committed embedded LLaVA-NeXT, float32, eval mode (one per module)."""
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from llava.embedded import paths

    model = LlavaNextForConditionalGeneration.from_pretrained(paths.CHECKPOINT_DIR, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(paths.CHECKPOINT_DIR)


@pytest.fixture(scope="module")
def embedded_eval_records():
    from llava import data
    from llava.embedded import paths

    return data.load_records(paths.EVAL_DATA_PATH)
