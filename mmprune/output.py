"""Output folders written atomically: everything goes to a temporary sibling folder, which is
renamed into place only when complete. The input checkpoint is never a valid output."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

from mmprune.errors import UserInputError


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_dir(output_dir: str, overwrite: bool, protected: list[str]) -> None:
    """Refuse an existing folder (unless overwrite) and any folder that holds or is an input."""
    for path in protected:
        if path and (_inside(output_dir, path) or _inside(path, output_dir)):
            raise UserInputError(
                f"output folder {output_dir} overlaps the input {path}; the input is never "
                "modified: choose another --save_model / OUTPUT_DIR"
            )
    if os.path.exists(output_dir) and not overwrite:
        raise UserInputError(
            f"output folder {output_dir} already exists; remove it, choose another OUTPUT_DIR / "
            "--save_model, or pass --overwrite"
        )


@contextmanager
def atomic_output_dir(output_dir: str, overwrite: bool):
    """Yield a temporary folder beside `output_dir`; on success it replaces `output_dir`."""
    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; outputs are meant to be shared
    try:
        yield staging
        if os.path.exists(output_dir):
            if not overwrite:
                raise UserInputError(f"output folder {output_dir} appeared while running; nothing was replaced")
            retired = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
            os.replace(output_dir, os.path.join(retired, "old"))
            os.replace(staging, output_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
