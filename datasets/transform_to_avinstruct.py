"""Turn AVInstruct annotations into the JSON that `python -m videollama2.pruners` reads.

    python datasets/transform_to_avinstruct.py --video_dir AVQA_music \
        --dataset_path1 avinstruct_part1.json --dataset_path2 avinstruct_part2.json \
        --save_path datasets/avinstruct_avqa_music.json

Each record becomes {"id", "video": "<video_id>.mp4", "audio": "<video_id>.mp4", "conversations"}
(the audio is the video's own track), with "<video>\n" leading the first human turn and "<Q>"
removed. Annotations whose video is missing from --video_dir are dropped; the count is printed.
Bad input ends with one `error:` line and exit status 2, and writes nothing. See
videollama2/avinstruct.py.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run as a plain script: make the repo's packages importable

from mmprune.base.entry import run_main
from videollama2.avinstruct import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
