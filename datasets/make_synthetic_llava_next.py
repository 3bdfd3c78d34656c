"""Regenerate the embedded synthetic LLaVA-NeXT data under playground/embedded/LLaVA-NeXT-Data.

    python datasets/make_synthetic_llava_next.py [--seed S] [--out DIR] [...]

A thin wrapper around `python -m llava.embedded.synthetic_vqa` (see its --help) that defaults
--out to the embedded data root, so it can be run from anywhere without installing the package.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script: make the repo's packages importable

from llava.embedded import paths, synthetic_vqa  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in argv):
        argv = ["--out", str(paths.DATA_ROOT)] + argv
    sys.exit(synthetic_vqa.main(argv))
