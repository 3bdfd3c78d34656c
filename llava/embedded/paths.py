"""Where the embedded LLaVA-NeXT default lives in the repository.

The embedded default is a tiny LLaVA-NeXT plus synthetic data, committed so that every command
runs offline. Paths are absolute (resolved from this file) so the defaults work from any cwd.
"""

from pathlib import Path

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

CHECKPOINT_DIR = REPO_ROOT / "checkpoints" / "embedded" / "llava-next-tiny"

# The real-data defaults (used by split_finetune_llava_next.py, as in the public TAMP code).
REAL_DATA_PATH = Path("playground/LLaVA-NeXT-Data/llava_next_raw_format/llava_next_raw_format_processed.json")
