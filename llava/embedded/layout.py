"""Where the embedded LLaVA-NeXT's files live in the repository (absolute paths, from this file), with
no imports of the tree: the modules that build the embedded model use it, and llava.embedded.paths
adds the default-model choice on top."""

from pathlib import Path

from mmprune.embedded.defaults import repo_relative

REPO_ROOT = Path(__file__).resolve().parents[2]

# Layout mirrors the real `playground/LLaVA-NeXT-Data/` so the same code reads both.
DATA_ROOT = REPO_ROOT / "playground" / "embedded" / "LLaVA-NeXT-Data"
RAW_DIR = DATA_ROOT / "llava_next_raw_format"
DATA_PATH = RAW_DIR / "llava_next_raw_format_processed.json"
IMAGE_FOLDER = RAW_DIR
TASK_SPLIT_PATH = RAW_DIR / "task_split.json"
CALIBRATION_TASK = "sharegpt4v"

EVAL_DIR = DATA_ROOT / "eval"
EVAL_DATA_PATH = EVAL_DIR / "synthvqa_eval.json"
EVAL_IMAGE_FOLDER = EVAL_DIR / "images"

CHECKPOINT_DIR = REPO_ROOT / "checkpoints" / "embedded" / "llava-next-tiny"  # the tiny model
SMOL_CHECKPOINT_DIR = REPO_ROOT / "checkpoints" / "embedded" / "llava-next-smol"
SMOL_PARTS_DIR = REPO_ROOT / "checkpoints" / "embedded" / "llava-next-smol-parts"

# The real-data defaults (used by split_finetune_llava_next.py, as in the public TAMP code).
REAL_DATA_PATH = Path("playground/LLaVA-NeXT-Data/llava_next_raw_format/llava_next_raw_format_processed.json")
REAL_MODEL = "checkpoints/llama3-llava-next-8b"
REAL_DATA = str(REAL_DATA_PATH)


def shown(path) -> str:
    """`path` relative to the repository when inside it, else as given."""
    return repo_relative(path, REPO_ROOT)
