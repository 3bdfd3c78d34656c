"""Where the embedded VideoLLaMA2-AV's files live in the repository (absolute paths, from this file), with
no imports of the tree: the modules that build the embedded model and its data use it, and
videollama2.embedded.paths adds the default-model choice on top."""

from pathlib import Path

from mmprune.embedded.defaults import repo_relative

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
    """`path` relative to the repository when inside it, else as given."""
    return repo_relative(path, REPO_ROOT)
