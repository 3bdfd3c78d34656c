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

from mmprune.embedded.defaults import EmbeddedModels
from mmprune.embedded.defaults import announce as announce_embedded

# the locations, re-exported: this module is the public face of the embedded default
from llava.embedded.layout import (  # noqa: F401
    REPO_ROOT, DATA_ROOT, RAW_DIR, DATA_PATH, IMAGE_FOLDER, TASK_SPLIT_PATH, CALIBRATION_TASK, EVAL_DIR,
    EVAL_DATA_PATH, EVAL_IMAGE_FOLDER, CHECKPOINT_DIR, SMOL_CHECKPOINT_DIR, REAL_DATA_PATH, REAL_MODEL,
    REAL_DATA,
)


def _assemble_smol() -> None:
    from llava.embedded import smol  # about a minute, once; a no-op while the checkpoint is current

    smol.assemble(SMOL_CHECKPOINT_DIR)


MODELS = EmbeddedModels(
    repo_root=REPO_ROOT,
    checkpoints={"smol": SMOL_CHECKPOINT_DIR, "tiny": CHECKPOINT_DIR},
    names={"smol": "SmolLM2-135M-Instruct LLaVA-NeXT (real pretrained decoder)",
           "tiny": "tiny LLaVA-NeXT (4-layer decoder trained from scratch)"},
    titles={"smol": "the embedded LLaVA-NeXT on SmolLM2-135M-Instruct",
            "tiny": "the tiny embedded LLaVA-NeXT (4-layer decoder trained from scratch)"},
    assemble_smol=_assemble_smol,
    real_model=REAL_MODEL,
)
embedded_choice = MODELS.choice
default_checkpoint = MODELS.default_checkpoint
is_embedded = MODELS.is_embedded
is_tiny = MODELS.is_tiny
results_suffix = MODELS.results_suffix
model_title = MODELS.model_title
shown = MODELS.shown
resolve_model = MODELS.resolve_model


def announce(notes: list) -> None:
    """The loud banner of a run on the embedded default (nothing when `notes` is empty)."""
    announce_embedded(notes, "MODEL_PATH / DATA_PATH (or --model_path / --data_path)")


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
    from llava.parquet_data import is_parquet_source

    if not is_parquet_source(args.data_path):  # parquet shards hold their images and tasks
        data_dir = os.path.dirname(os.path.abspath(args.data_path))
        args.image_folder = args.image_folder or data_dir
        args.task_split_path = args.task_split_path or os.path.join(data_dir, "task_split.json")
    announce(notes)
    return embedded_model
