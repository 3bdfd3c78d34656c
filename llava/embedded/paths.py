"""Where the embedded LLaVA-NeXT default lives in the repository.

The embedded default is a LLaVA-NeXT plus synthetic data that every command runs on offline:
- "smol" (the default): the real pretrained SmolLM2-135M-Instruct decoder with committed trained
  vision parts, assembled on first use into checkpoints/embedded/llava-next-smol (llava/embedded/smol.py);
- "tiny": a 4-layer model trained from scratch, committed whole; fast, for the test suite and a
  one-minute pipeline check, but its pruning behaviour is not a real LLM's.
EMBEDDED_MODEL=tiny|smol picks one. Paths are absolute (resolved from this file) so the defaults
work from any cwd.
"""

import os
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

CHECKPOINT_DIR = REPO_ROOT / "checkpoints" / "embedded" / "llava-next-tiny"  # the tiny model
SMOL_CHECKPOINT_DIR = REPO_ROOT / "checkpoints" / "embedded" / "llava-next-smol"
EMBEDDED_CHOICES = {"smol": SMOL_CHECKPOINT_DIR, "tiny": CHECKPOINT_DIR}
EMBEDDED_NAMES = {"smol": "SmolLM2-135M-Instruct LLaVA-NeXT (real pretrained decoder)",
                  "tiny": "tiny LLaVA-NeXT (4-layer decoder trained from scratch)"}

# The real-data defaults (used by split_finetune_llava_next.py, as in the public TAMP code).
REAL_DATA_PATH = Path("playground/LLaVA-NeXT-Data/llava_next_raw_format/llava_next_raw_format_processed.json")
REAL_MODEL = "checkpoints/llama3-llava-next-8b"
REAL_DATA = str(REAL_DATA_PATH)


def shown(path) -> str:
    """`path` relative to the repository when it lies inside it (for reports and docs that are
    committed), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def embedded_choice() -> str:
    """"smol" or "tiny", from $EMBEDDED_MODEL (default smol; one choice for both trees)."""
    from mmprune.smollm2 import embedded_choice as choice

    return choice()


def default_checkpoint() -> Path:
    """The embedded checkpoint $EMBEDDED_MODEL names; the smol one is assembled first if it is
    missing or older than its committed parts (about a minute, once)."""
    choice = embedded_choice()
    if choice == "smol":
        from llava.embedded import smol

        smol.assemble(SMOL_CHECKPOINT_DIR)
    return EMBEDDED_CHOICES[choice]


def is_embedded(model_path) -> bool:
    return any(os.path.realpath(model_path) == os.path.realpath(p) for p in EMBEDDED_CHOICES.values())


def is_tiny(model_path) -> bool:
    return os.path.realpath(model_path) == os.path.realpath(CHECKPOINT_DIR)


def results_suffix(model_path) -> str:
    """Results of the tiny model are kept beside the default's: "_tiny" in their file and section names."""
    return "_tiny" if is_tiny(model_path) else ""


def model_title(model_path) -> str:
    """How docs/results.md names the model of a section."""
    if is_tiny(model_path):
        return "the tiny embedded LLaVA-NeXT (4-layer decoder trained from scratch)"
    if os.path.realpath(model_path) == os.path.realpath(SMOL_CHECKPOINT_DIR):
        return "the embedded LLaVA-NeXT on SmolLM2-135M-Instruct"
    return f"`{shown(model_path)}`"


def resolve_model(args, notes: list) -> bool:
    """Fill args.model_path: the README's real checkpoint when it exists, else the embedded one
    (a line for the banner goes to `notes`). Returns whether the model is an embedded one."""
    if args.model_path is None:
        if os.path.isdir(REAL_MODEL):
            args.model_path = REAL_MODEL
        else:
            args.model_path = str(default_checkpoint())
            notes.append(f"model: {REAL_MODEL} not found -> EMBEDDED {EMBEDDED_NAMES[embedded_choice()]} "
                         f"{shown(args.model_path)}")
    return is_embedded(args.model_path)


def announce(notes: list) -> None:
    """The loud banner of a run on the embedded default (nothing when `notes` is empty)."""
    from mmprune.cli import banner

    if notes:
        banner(["RUNNING ON THE EMBEDDED DEFAULT (small model / synthetic data, for trying the pipeline)"] + notes
               + ["Set MODEL_PATH / DATA_PATH (or --model_path / --data_path) for a real checkpoint."])


def resolve_model_and_data(args) -> bool:
    """Fill args.model_path / data_path / image_folder / task_split_path in place: the README's
    real paths when they exist, else the embedded default, announced by a banner. Explicit paths
    are never replaced (a missing one is reported by the loaders). Returns whether the model is
    the embedded one."""
    notes: list = []
    embedded_model = resolve_model(args, notes)
    if args.data_path is None:
        if os.path.isfile(REAL_DATA):
            args.data_path = REAL_DATA
        else:
            args.data_path = str(DATA_PATH)
            args.image_folder = args.image_folder or str(IMAGE_FOLDER)
            notes.append(f"data:  {REAL_DATA} not found -> EMBEDDED synthetic VQA {args.data_path}")
    data_dir = os.path.dirname(os.path.abspath(args.data_path))
    args.image_folder = args.image_folder or data_dir
    args.task_split_path = args.task_split_path or os.path.join(data_dir, "task_split.json")
    announce(notes)
    return embedded_model
