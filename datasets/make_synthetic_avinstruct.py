"""Regenerate the embedded synthetic audio-visual QA data under playground/embedded/AVInstruct.

    python datasets/make_synthetic_avinstruct.py [--seed S] [--out DIR] [--n-calib N] [--n-eval N]

A thin wrapper around `python -m videollama2.embedded.synthetic_av` (see its --help), runnable
from anywhere without installing the package.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script: make the repo's packages importable

from videollama2.embedded import synthetic_av  # noqa: E402

if __name__ == "__main__":
    sys.exit(synthetic_av.main(sys.argv[1:]))
