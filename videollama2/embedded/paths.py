"""Where the embedded VideoLLaMA2-AV default lives in the repository (absolute paths, so the
defaults work from any working directory).

The layout mirrors the real defaults: an AVInstruct-transformed JSON and its media folder
(datasets/avinstruct_avqa_music.json + datasets/AVQA_music for the real data).
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

DATA_ROOT = REPO_ROOT / "playground" / "embedded" / "AVInstruct"
MEDIA_FOLDER = DATA_ROOT / "AVQA_music"
DATA_PATH = DATA_ROOT / "avinstruct_avqa_music.json"
EVAL_DATA_PATH = DATA_ROOT / "avinstruct_avqa_music_eval.json"
ANNOTATIONS = (DATA_ROOT / "annotations" / "avinstruct_part1.json",
               DATA_ROOT / "annotations" / "avinstruct_part2.json")

CHECKPOINT_DIR = REPO_ROOT / "checkpoints" / "embedded" / "videollama2-av-tiny"
# the SmolLM2-decoder model (videollama2/embedded/smol.py) and its harder task (synthetic_av "hard")
SMOL_CHECKPOINT_DIR = REPO_ROOT / "checkpoints" / "embedded" / "videollama2-av-smol"
SMOL_PARTS_DIR = REPO_ROOT / "checkpoints" / "embedded" / "videollama2-av-smol-parts"
HARD_DATA_ROOT = REPO_ROOT / "playground" / "embedded" / "AVInstruct-hard"
HARD_MEDIA_FOLDER = HARD_DATA_ROOT / "AVQA_music"
HARD_DATA_PATH = HARD_DATA_ROOT / "avinstruct_avqa_music.json"
HARD_EVAL_DATA_PATH = HARD_DATA_ROOT / "avinstruct_avqa_music_eval.json"

# The real defaults of the public scripts (relative to the repository root).
REAL_MODEL = "checkpoints/VideoLLaMA2.1-7B-AV"
REAL_DATA = "datasets/avinstruct_avqa_music.json"
REAL_MEDIA = "datasets/AVQA_music"


def shown(path) -> str:
    """`path` relative to the repository when inside it (for committed reports), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)
