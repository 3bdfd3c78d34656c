"""Output paths of every entry point: checked before any heavy work, written atomically, and
replaced only when this project wrote them.

* `check_output_dir` / `check_output_file`: refuse an output that is, lies inside or holds an input;
  one whose parent path runs through a regular file or an unwritable folder; an existing one
  without --overwrite; and, with --overwrite, one this project did not write.
* `atomic_output_dir` / `atomic_output_file`: write into a hidden temporary sibling, renamed into
  place only when complete. SIGINT, SIGTERM and SIGHUP (mmprune/base/interrupt.py) and errors remove it.
  Output folders get the marker file MARKER, which is what --overwrite looks for.
* Every output file gets mode 0666 and every folder 0777 minus the umask (0644 / 0755 under the
  usual umask 022); some writers (safetensors) create private 0600 files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Callable

from mmprune.base.errors import UserInputError
from mmprune.base.interrupt import signals_deferred, signals_raise

MARKER = ".mmprune-output"
# report files of the output folders written before MARKER existed
OWN_REPORTS = ("pruning_report.json", "eas_report.json", "training_info.json")


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_tree(path: str) -> None:
    """chmod `path` (a file or a folder and everything in it) to 0666 / 0777 minus the umask."""
    mask = _umask()
    if not os.path.isdir(path):
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                os.chmod(full, 0o666 & ~mask)


def check_output_location(path: str, protected, flag: str) -> None:
    """`path` neither is, lies inside nor holds any of `protected`, and it can be created: the
    nearest existing folder above it is a folder (not a regular file) that takes new entries."""
    for input_path in protected:
        if input_path and (_inside(path, input_path) or _inside(input_path, path)):
            raise UserInputError(
                f"output {path} overlaps the input {input_path}; the input is never modified: choose "
                f"another {flag}")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent) and not os.path.islink(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserInputError(f"output {path} cannot be created: {parent} is a file, not a folder; "
                             f"choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserInputError(f"output {path} cannot be created: no write permission in {parent}; "
                             f"choose another {flag}")
    # permission bits do not tell everything (/proc and /sys, a read-only mount, a full disk): try,
    # with a probe folder removed at once
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mmprune-probe-", dir=parent))
    except OSError as exc:
        raise UserInputError(f"output {path} cannot be created: {parent} does not accept new files or folders "
                             f"({exc.strerror or exc.__class__.__name__}); choose another {flag}") from None


def is_own_output_dir(path: str) -> bool:
    """A folder this project wrote (its marker, or an older output's report), or an empty one."""
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, MARKER)) or not os.listdir(path):
        return True
    for name in OWN_REPORTS:
        try:
            with open(os.path.join(path, name), encoding="utf-8") as handle:
                if isinstance(json.load(handle), dict):
                    return True
        except (OSError, ValueError):
            continue
    return False


def check_output_dir(output_dir: str, overwrite: bool, protected, flag: str = "--save_model / OUTPUT_DIR") -> None:
    """Before any heavy work: refuse an output folder that overlaps an input, cannot be created,
    already exists (unless overwrite), or, with overwrite, holds something this project did not write."""
    check_output_location(output_dir, protected, flag)
    if os.path.isdir(output_dir):
        if not overwrite:
            raise UserInputError(f"output folder {output_dir} already exists; remove it, choose another {flag}, "
                                 "or pass --overwrite (OVERWRITE=1)")
        if not is_own_output_dir(output_dir):
            raise UserInputError(
                f"output folder {output_dir} was not written by this project (no {MARKER} or report file in "
                f"it); --overwrite only replaces earlier outputs: move it away yourself or choose another {flag}")
    elif os.path.lexists(output_dir):
        raise UserInputError(f"output folder {output_dir} exists and is not a folder; choose another {flag}")


def check_output_file(path: str, overwrite: bool, protected, flag: str, is_own: Callable[[str], bool],
                      what: str = "file") -> None:
    """The same for an output file; `is_own(path)` tells whether an existing file is this
    project's (e.g. a recipe JSON with its own keys) and may be replaced."""
    check_output_location(path, protected, flag)
    if os.path.isdir(path):
        raise UserInputError(f"output {path} is a folder; {flag} names the {what} to write: give a file path")
    if os.path.lexists(path):
        if not overwrite:
            raise UserInputError(f"{what} {path} already exists; remove it, choose another {flag}, or pass --overwrite")
        if not os.path.isfile(path) or not is_own(path):
            raise UserInputError(f"{path} is not a {what} written by this project; it is only replaced by one: "
                                 f"move it away yourself or choose another {flag}")


def _replace(staging: str, target: str) -> None:
    """Move `staging` onto `target`; an existing `target` folder goes to a hidden sibling first,
    removed once the new one is in place."""
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.lexists(target):
        os.replace(staging, target)
        return
    retired = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
    os.replace(target, os.path.join(retired, "old"))
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


@contextmanager
def atomic_output_dir(output_dir: str, overwrite: bool):
    """Yield a temporary folder beside `output_dir`; on success it replaces `output_dir` (an existing
    one only with `overwrite` and only if this project wrote it). On any error or signal the
    temporary folder is removed."""
    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    staging = None
    with signals_raise():
        try:
            os.makedirs(parent, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
            with open(os.path.join(staging, MARKER), "w", encoding="utf-8") as handle:
                json.dump({"written_by": "mmprune", "note": "--overwrite may replace this folder"}, handle)
                handle.write("\n")
            yield staging
            share_tree(staging)
            if os.path.lexists(output_dir):
                if not overwrite:
                    raise UserInputError(f"output folder {output_dir} appeared while running; nothing was replaced")
                if not is_own_output_dir(output_dir):
                    raise UserInputError(f"output folder {output_dir} appeared while running and was not written "
                                         "by this project; nothing was replaced")
            with signals_deferred():
                _replace(staging, output_dir)
                staging = None
        except BaseException:
            if staging is not None:
                with signals_deferred():
                    shutil.rmtree(staging, ignore_errors=True)
            raise


@contextmanager
def atomic_output_file(path: str):
    """Yield a temporary file path beside `path` (hidden `.NAME.tmp-*`); on success it replaces
    `path`. On any error or signal the temporary file is removed."""
    parent = os.path.dirname(os.path.abspath(path))
    tmp = None
    with signals_raise():
        try:
            os.makedirs(parent, exist_ok=True)
            handle, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
            os.close(handle)
            yield tmp
            share_tree(tmp)
            with signals_deferred():
                os.replace(tmp, path)
                tmp = None
        except BaseException:
            if tmp is not None:
                with signals_deferred():
                    if os.path.lexists(tmp):
                        os.unlink(tmp)
            raise


def write_json_file(path: str, data, indent: int = 1, default=None) -> None:
    """`data` as JSON (with a final newline) into `path`, atomically; `default` as in json.dump."""
    with atomic_output_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=indent, default=default)
            handle.write("\n")
