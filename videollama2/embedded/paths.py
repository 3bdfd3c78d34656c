"""Where the embedded VideoLLaMA2-AV default lives in the repository (absolute paths, so the
defaults work from any working directory).

Two embedded models, chosen like the LLaVA-NeXT ones by EMBEDDED_MODEL=smol|tiny (default smol):
- "smol": the real pretrained SmolLM2-135M-Instruct decoder (Qwen2 form) with committed trained
  towers and projectors, assembled on first use into checkpoints/embedded/videollama2-av-smol
  (videollama2/embedded/smol.py), on the hard synthetic task (AVInstruct-hard);
- "tiny": a small decoder trained from scratch, committed whole, on the basic task (AVInstruct);
  fast, for the test suite, but saturated (dense accuracy 1.000) and not a real LLM.
The layout mirrors the real defaults: an AVInstruct-transformed JSON and its media folder
(datasets/avinstruct_avqa_music.json + datasets/AVQA_music for the real data).
"""

from dataclasses import dataclass
from pathlib import Path

from mmprune.embedded.defaults import EmbeddedModels

# the locations, re-exported: this module is the public face of the embedded default
from videollama2.embedded.layout import (  # noqa: F401
    REPO_ROOT, DATA_ROOT, MEDIA_FOLDER, DATA_PATH, EVAL_DATA_PATH, ANNOTATIONS, CHECKPOINT_DIR,
    SMOL_CHECKPOINT_DIR, SMOL_PARTS_DIR, HARD_DATA_ROOT, HARD_MEDIA_FOLDER, HARD_DATA_PATH, HARD_EVAL_DATA_PATH,
    REAL_MODEL, REAL_DATA, REAL_MEDIA,
)


@dataclass(frozen=True)
class EmbeddedData:
    """An embedded task: calibration JSON, held-out JSON and the media folder of both."""
    data_path: Path
    eval_data_path: Path
    media_folder: Path
    title: str
    variant: str = "basic"  # synthetic_av's task variant, for data generated on the fly


DATA = {"smol": EmbeddedData(HARD_DATA_PATH, HARD_EVAL_DATA_PATH, HARD_MEDIA_FOLDER, "hard synthetic audio-visual QA",
                             "hard"),
        "tiny": EmbeddedData(DATA_PATH, EVAL_DATA_PATH, MEDIA_FOLDER, "synthetic audio-visual QA")}


def _assemble_smol() -> None:
    from videollama2.embedded import smol  # about half a minute, once; a no-op while current

    smol.assemble(SMOL_CHECKPOINT_DIR, SMOL_PARTS_DIR)


MODELS = EmbeddedModels(
    repo_root=REPO_ROOT,
    checkpoints={"smol": SMOL_CHECKPOINT_DIR, "tiny": CHECKPOINT_DIR},
    names={"smol": "SmolLM2-135M-Instruct VideoLLaMA2-AV (real pretrained decoder)",
           "tiny": "tiny VideoLLaMA2-AV (decoder trained from scratch)"},
    titles={"smol": "the embedded VideoLLaMA2-AV on SmolLM2-135M-Instruct (hard task)",
            "tiny": "the tiny embedded VideoLLaMA2-AV (decoder trained from scratch, basic task)"},
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


def embedded_data(model_path=None) -> EmbeddedData:
    """The task of an embedded model: the tiny model's basic one, the smol model's hard one; for
    any other model, that of the model EMBEDDED_MODEL names."""
    which = MODELS.which(model_path) if model_path is not None else None
    return DATA[which or embedded_choice()]
